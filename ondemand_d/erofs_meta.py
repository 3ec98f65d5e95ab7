# SPDX-License-Identifier: Apache-2.0
"""Which blocks of an EROFS image are metadata: what a bootstrap prefill writes.

The daemon's own small reader of the on-disk format (erofs-format.md), apart
from the builder's image/ package, which `serve` never imports.

The kernel reads an image's metadata (superblock, device table, inodes with
their inline xattrs and tails, directory blocks, shared xattrs, symlink
targets) one synchronous 4 KiB page at a time; file data it reads in large
asynchronous requests. Prefilling the metadata and nothing else makes a mount
fast without writing the data of a plain image (where the "bootstrap" is the
whole image) before the first READ.

The walk follows the directory tree from the root (spec §2-§5, §8; compressed
files' map headers and indexes as fs/erofs/zmap.c reads them), reading
through `read(off, len)`. The image is untrusted: every nid is visited once,
every offset is checked against the image size, and anything unexpected
(another block size, a compressed directory) raises `ValueError`; the caller
then prefills the whole blob as before.
"""
from __future__ import annotations

import stat
import struct
from collections.abc import Callable
from typing import NamedTuple

Read = Callable[[int, int], bytes]

BLOCK = 4096
_BLKSZBITS = 12
_SB_OFFSET = 1024
_EROFS_MAGIC = 0xE0F5E1E2
_SLOT = 32  # nid * 32 from meta_blkaddr (spec §3.1)
_DEVICE_SLOT = 128
_NULL_ADDR = 0xFFFFFFFF
_SB = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQ")  # spec §2.1, the fields used here
_COMPACT = struct.Struct("<HHHHIIII")  # spec §3.3: format, icount, mode, nlink, size, -, i_u
_EXTENDED = struct.Struct("<HHHHQI")  # spec §3.4: format, icount, mode, -, size, i_u
_DIRENT = struct.Struct("<QHBB")  # spec §4.1
_XATTR_HEADER = 12  # spec §8.1
_FLAT_PLAIN, _COMPRESSED_FULL, _FLAT_INLINE, _COMPRESSED_COMPACT, _CHUNK_BASED = 0, 1, 2, 3, 4
_CHUNK_FORMAT_INDEXES = 0x20
# Compressed inodes (fs/erofs/erofs_fs.h, zmap.c): an 8-byte map header at the inode's end
# aligned to 8, then the lcluster indexes, then (ztailpacking) the inline tail pcluster.
_Z_MAP_HEADER = struct.Struct("<HHHBB")  # -, h_idata_size, h_advise, h_algorithmtype, h_clusterbits
_Z_COMPACTED_2B = 0x0001
_Z_INLINE_PCLUSTER = 0x0008
_Z_FRAGMENT_INODE = 0x80  # in h_clusterbits: the whole file is in the packed inode
MAX_INODES = 1 << 22


def metadata_ranges(read: Read, size: int) -> list[tuple[int, int]]:
    """Block-aligned, merged (start, end) byte ranges of the image's metadata.

    Raises:
        ValueError: not an EROFS image this walk understands, or a malformed one.
    """
    walk = _Walk(read, size)
    walk.run()
    return _merge(walk.blocks)


class _Walk:
    def __init__(self, read: Read, size: int) -> None:
        self.read = read
        self.size = size
        self.blocks: set[int] = set()

    def _get(self, off: int, length: int) -> bytes:
        if off < 0 or length < 0 or off + length > self.size:
            msg = f"metadata at {off}+{length} lies outside the {self.size}-byte image"
            raise ValueError(msg)
        data = self.read(off, length)
        if len(data) != length:
            msg = f"short read at {off}"
            raise ValueError(msg)
        return data

    def _mark(self, off: int, length: int) -> None:
        if length <= 0:
            return
        if off + length > -(-self.size // BLOCK) * BLOCK:
            msg = f"metadata at {off}+{length} lies outside the {self.size}-byte image"
            raise ValueError(msg)
        self.blocks.update(range(off // BLOCK, -(-(off + length) // BLOCK)))

    def run(self) -> None:
        raw = self._get(_SB_OFFSET, _SB.size)
        sb = _SB.unpack(raw)
        magic, blkszbits, root_nid, meta_blkaddr, xattr_blkaddr = sb[0], sb[3], sb[5], sb[10], sb[11]
        extra_devices, devt_slotoff = sb[16], sb[17]
        prefix_count, prefix_start = sb[19], sb[20]
        if magic != _EROFS_MAGIC or blkszbits != _BLKSZBITS:
            msg = "not an EROFS image with 4 KiB blocks"
            raise ValueError(msg)
        self.meta = meta_blkaddr * BLOCK
        self.xattrs = xattr_blkaddr * BLOCK
        self._mark(0, BLOCK)
        if extra_devices:
            self._mark(devt_slotoff * _DEVICE_SLOT, extra_devices * _DEVICE_SLOT)
        pos = prefix_start * 4
        for _ in range(prefix_count):  # long xattr name prefixes (spec §8.4)
            (length,) = struct.unpack("<H", self._get(pos, 2))
            self._mark(pos, 2 + length)
            pos += _align(2 + length, 4)
        seen: set[int] = set()
        # The packed inode holds compressed files' tails (FRAGMENTS): its inode and index are
        # read before any of them, and no directory names it.
        packed_nid = sb[21]
        pending = [root_nid, *([packed_nid] if packed_nid else [])]
        while pending:
            nid = pending.pop()
            if nid in seen:
                continue
            if len(seen) >= MAX_INODES:
                msg = "more inodes than any image this daemon serves"
                raise ValueError(msg)
            seen.add(nid)
            pending.extend(n for n in self._inode(nid) if n not in seen)

    def _inode(self, nid: int) -> list[int]:
        """Mark one inode's metadata; the nids of its children if it is a directory."""
        at = self.meta + nid * _SLOT
        head = self._get(at, 32)
        if head[0] & 1:  # extended (64 bytes)
            i_format, icount, mode, _, size, i_u = _EXTENDED.unpack_from(self._get(at, 64))
            isize = 64
        else:
            i_format, icount, mode, _, size, _, i_u, _ = _COMPACT.unpack_from(head)
            isize = 32
        h = _Inode((i_format >> 1) & 0x7, mode, size, i_u)
        body_end = at + isize + (_XATTR_HEADER + 4 * (icount - 1) if icount else 0)
        if icount:
            self._shared_xattrs(at + isize)
        kind = stat.S_IFMT(h.mode)
        is_dir, is_link = kind == stat.S_IFDIR, kind == stat.S_IFLNK
        if h.datalayout == _CHUNK_BASED:
            chunk_format = h.i_u & 0xFFFF
            index = 8 if chunk_format & _CHUNK_FORMAT_INDEXES else 4
            chunkbits = _BLKSZBITS + (chunk_format & 0x1F)
            count = -(-h.size // (1 << chunkbits)) if h.size else 0
            start = _align(body_end, index) if index == 8 else body_end  # noqa: PLR2004
            self._mark(at, start + count * index - at)
            if not (is_dir or is_link):
                return []
            data = self._chunked(h.size, chunkbits, index, start, count)
        elif h.datalayout in (_FLAT_PLAIN, _FLAT_INLINE):
            tail = h.size % BLOCK if h.datalayout == _FLAT_INLINE else 0
            full = h.size - tail
            self._mark(at, body_end + tail - at)
            if not (is_dir or is_link) or h.size == 0:
                return []
            head_data = b""
            if full:
                self._mark(h.i_u * BLOCK, full)
                head_data = self._get(h.i_u * BLOCK, full)
            data = head_data + (self._get(body_end, tail) if tail else b"")
        elif h.datalayout in (_COMPRESSED_FULL, _COMPRESSED_COMPACT) and not (is_dir or is_link):
            self._mark(at, self._z_index_end(h, body_end) - at)
            return []
        else:
            msg = f"inode {nid}: layout {h.datalayout} is not understood here"
            raise ValueError(msg)
        if not is_dir:
            return []
        return _children(data)

    def _z_index_end(self, h: _Inode, body_end: int) -> int:
        """Where a compressed file's map header, lcluster indexes and inline tail end.

        As the kernel reads them (zmap.c): full indexes are 8 bytes each after an 8-byte
        gap; compact ones are 4 bytes each until a 32-byte boundary, then 2-byte ones in
        packs of 16 (with COMPACTED_2B), then 4-byte ones in packs of 2. One index per
        block of the file.
        """
        header = _align(body_end, 8)
        _, idata_size, advise, _, clusterbits = _Z_MAP_HEADER.unpack(self._get(header, 8))
        end = header + 8
        if clusterbits & _Z_FRAGMENT_INODE:
            return end  # no indexes: the file lives in the packed inode
        count = -(-h.size // BLOCK)
        if h.datalayout == _COMPRESSED_FULL:
            end += 8 + count * 8
        else:
            initial = min(((32 - end % 32) // 4) & 7, count)
            twos = (count - initial) // 16 * 16 if advise & _Z_COMPACTED_2B else 0
            end += initial * 4 + twos * 2 + _align((count - initial - twos) * 4, 8)
        if advise & _Z_INLINE_PCLUSTER:
            end += idata_size
        return end

    def _chunked(self, size: int, chunkbits: int, index: int, start: int, count: int) -> bytes:
        raw = self._get(start, count * index)
        parts = []
        for k in range(count):
            if index == 8:  # noqa: PLR2004
                _, device, blkaddr = struct.unpack_from("<HHI", raw, k * 8)
            else:
                device, (blkaddr,) = 0, struct.unpack_from("<I", raw, k * 4)
            length = min(1 << chunkbits, size - (k << chunkbits))
            if blkaddr == _NULL_ADDR:
                parts.append(bytes(length))
                continue
            if device != 0:
                msg = "a directory on an extra device"
                raise ValueError(msg)
            self._mark(blkaddr * BLOCK, length)
            parts.append(self._get(blkaddr * BLOCK, length))
        return b"".join(parts)

    def _shared_xattrs(self, at: int) -> None:
        count = self._get(at + 4, 1)[0]  # h_shared_count (spec §8.1)
        if not count:
            return  # no 0-byte read: the daemon's chunk reader refuses those
        ids = self._get(at + _XATTR_HEADER, 4 * count)
        for (xid,) in struct.iter_unpack("<I", ids):
            pos = self.xattrs + xid * 4
            name_len, _, value_size = struct.unpack("<BBH", self._get(pos, 4))
            self._mark(pos, 4 + name_len + value_size)


class _Inode(NamedTuple):
    datalayout: int
    mode: int
    size: int
    i_u: int


def _children(data: bytes) -> list[int]:
    """The nids a directory's blocks name, '.' and '..' left out (spec §4)."""
    out = []
    for start in range(0, len(data), BLOCK):
        block = data[start : start + BLOCK]
        _, first, _, _ = _DIRENT.unpack_from(block)
        count = first // _DIRENT.size
        if count == 0 or count * _DIRENT.size > len(block):
            msg = "a directory block with no room for its dirents"
            raise ValueError(msg)
        heads = [_DIRENT.unpack_from(block, i * _DIRENT.size) for i in range(count)]
        for i, (nid, off, _, _) in enumerate(heads):
            end = heads[i + 1][1] if i + 1 < count else _name_end(block, off)
            if block[off:end] not in (b".", b".."):
                out.append(nid)
    return out


def _name_end(block: bytes, off: int) -> int:
    nul = block.find(b"\0", off)
    return len(block) if nul < 0 else nul


def _align(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _merge(blocks: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        start = b * BLOCK
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], start + BLOCK)
        else:
            out.append((start, start + BLOCK))
    return out
