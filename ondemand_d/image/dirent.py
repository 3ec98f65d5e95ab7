# SPDX-License-Identifier: Apache-2.0
"""Directory data: sorted dirents packed into self-contained 4 KiB blocks (spec §4)."""
from __future__ import annotations

from ondemand_d.image.format import BLOCK, DIRENT_SIZE, dirent, parse_dirent


def encode_directory(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Encode (name, nid, file_type) rows, already sorted bytewise, as directory data.

    A new block starts when the next dirent and name would not fit (the
    mkfs.erofs rule, spec §4.2). Every block but the last is zero-padded; the
    data ends exactly at the last name, which is how the kernel finds its end.
    """
    blocks: list[bytes] = []
    batch: list[tuple[bytes, int, int]] = []
    used = 0
    for row in entries:
        cost = DIRENT_SIZE + len(row[0])
        if batch and used + cost > BLOCK:
            blocks.append(_block(batch).ljust(BLOCK, b"\0"))
            batch, used = [], 0
        batch.append(row)
        used += cost
    if batch:
        blocks.append(_block(batch))
    return b"".join(blocks)


def _block(rows: list[tuple[bytes, int, int]]) -> bytes:
    nameoff = DIRENT_SIZE * len(rows)
    heads: list[bytes] = []
    for name, nid, file_type in rows:
        heads.append(dirent(nid, nameoff, file_type))
        nameoff += len(name)
    return b"".join(heads) + b"".join(name for name, _, _ in rows)


def decode_directory(data: bytes) -> list[tuple[bytes, int, int]]:
    """Parse directory data back into (name, nid, file_type) rows (for tests and tools)."""
    rows: list[tuple[bytes, int, int]] = []
    for start in range(0, len(data), BLOCK):
        block = data[start : start + BLOCK]
        _, first, _ = parse_dirent(block)
        count = first // DIRENT_SIZE
        heads = [parse_dirent(block, i * DIRENT_SIZE) for i in range(count)]
        for i, (nid, off, ftype) in enumerate(heads):
            end = heads[i + 1][1] if i + 1 < count else _name_end(block, off)
            rows.append((block[off:end], nid, ftype))
    return rows


def _name_end(block: bytes, off: int) -> int:
    nul = block.find(b"\0", off)
    return len(block) if nul < 0 else nul
