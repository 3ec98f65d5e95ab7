# SPDX-License-Identifier: Apache-2.0
"""Fingerprints the daemon can check from metadata alone, and the check.

The kernel shares one page cache between the files of a domain whose
fingerprint xattrs are equal (spec §8.5; Linux 7.0+ `inode_share`), and reads
a shared file through "any one" of them: the fingerprint is the only thing
that says two files hold the same bytes. An image that copied another image's
fingerprint onto other bytes would put its bytes into the other image's page
cache, or read the other image's file.

So the fingerprint here (value tag `odfp2:`, after erofs-utils' `sha256:`)
is a digest of the file's size and the ordered store chunks that hold its
bytes: (chunk digest, offset in the chunk, length) per piece, or the length
of a hole. Every chunk is verified against its digest on every fill, so equal
fingerprints mean equal bytes (the tail of the last 4 KiB block, which mmap
shows past EOF, lies in the same store chunk, so it is pinned too). It is
computed from the bootstrap's chunk indexes and the data blobs' chunk tables,
both metadata: `check_image` needs no file data. Files whose data is not in
chunks of the data blobs (inline in the bootstrap) get no fingerprint.
"""
from __future__ import annotations

import hashlib
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ondemand_d.image import format as f
from ondemand_d.image.reader import _SHORT_PREFIXES, ImageReader, Inode
from ondemand_d.store import Blob

#: The value tag: a value without it (erofs-utils' `sha256:`, or ours before) is foreign.
TAG = b"odfp2:"
_DOMAIN = b"ondemand-d fingerprint v2\0"
_U64 = struct.Struct("<Q")
_BLKSZBITS_AT = f.SB_OFFSET + 12  # spec §2.1: blkszbits after magic, checksum, compat


class FingerprintError(ValueError):
    """A file's data cannot be named by store chunks (the message says why)."""


#: One EROFS chunk of a file: None (a hole), or (blob, byte offset in it).
Piece = tuple[Blob, int] | None


def value(size: int, chunkbits: int, pieces: Iterable[Piece]) -> bytes:
    """The fingerprint xattr value of a chunk-based file of `size` bytes.

    Raises:
        FingerprintError: a piece lies (partly) outside its blob.
    """
    h = hashlib.sha256(_DOMAIN + _U64.pack(size))
    step = 1 << chunkbits
    count = 0
    for k, piece in enumerate(pieces):
        count += 1
        length = min(step, size - k * step)
        if length <= 0:
            msg = f"chunk {k} lies past the end of a {size}-byte file"
            raise FingerprintError(msg)
        if piece is None:
            h.update(b"Z" + _U64.pack(length))
            continue
        blob, offset = piece
        if offset + length > blob.size:
            msg = f"chunk {k} ({offset}+{length}) lies outside blob {blob.blob_id[:12]}"
            raise FingerprintError(msg)
        for c in blob.chunks_for(offset, length):
            start, end = max(offset, c.offset), min(offset + length, c.end)
            digest = c.digest.encode()
            h.update(b"C" + bytes([len(digest)]) + digest
                     + _U64.pack(start - c.offset) + _U64.pack(end - start))
    if count != -(-size // step):
        msg = f"{count} chunks for a {size}-byte file of 2^{chunkbits}-byte chunks"
        raise FingerprintError(msg)
    return TAG + h.digest()


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an image's fingerprints may be trusted by the kernel, and why not."""

    safe: bool
    reason: str  # "" when safe
    fingerprinted: int = 0  # files with a fingerprint


def check_image(primary: bytes, devices: Sequence[Blob]) -> Verdict:
    """Check every fingerprint xattr of an image against its own chunk tables.

    Args:
        primary: the bootstrap (only its metadata is read; data blocks may be zeros).
        devices: the data blobs in the order the mount passes them (`device=`).

    Returns:
        safe only if the image has fingerprints and every one checks out; otherwise
        the reason ("image without fingerprints", "fingerprints not verified: ...").
    """
    try:
        return _check(primary, devices)
    except (ValueError, IndexError, KeyError, struct.error) as exc:
        return Verdict(safe=False, reason=f"fingerprints not verified: unreadable metadata ({exc})")


def _check(primary: bytes, devices: Sequence[Blob]) -> Verdict:
    reader = ImageReader(primary, [_no_data] * len(devices))
    sb = reader.sb
    if not sb.feature_compat & f.COMPAT_ISHARE_XATTRS:
        return Verdict(safe=False, reason="image without fingerprints")
    if primary[_BLKSZBITS_AT] != f.BLKSZBITS:
        return _refuse("not a 4 KiB block image")
    if sb.ishare_xattr_prefix_id >= sb.xattr_prefix_count:
        return _refuse("the fingerprint prefix id names no prefix record")
    name = reader.prefixes[sb.ishare_xattr_prefix_id]
    count = 0
    for path, ino in _inodes(reader):
        values = _fingerprints(reader, ino, name, sb.ishare_xattr_prefix_id)
        if values is None:
            return _refuse(f"{_p(path)} has shared xattrs, which this check does not read")
        if not values:
            continue
        if len(values) > 1:
            return _refuse(f"{_p(path)} has {len(values)} fingerprint xattrs")
        try:
            expected = _expected(reader, ino, devices, path)
        except ValueError as exc:
            return _refuse(str(exc))
        if values[0] != expected:
            why = "a foreign or old format" if not values[0].startswith(TAG) else "another file's"
            return _refuse(f"{_p(path)} carries {why} fingerprint")
        count += 1
    if count == 0:
        return Verdict(safe=False, reason="image without fingerprints")
    return Verdict(safe=True, reason="", fingerprinted=count)


def _expected(reader: ImageReader, ino: Inode, devices: Sequence[Blob], path: bytes) -> bytes:
    if not stat.S_ISREG(ino.mode) or ino.header.datalayout != f.LAYOUT_CHUNK_BASED:
        msg = f"{_p(path)} has a fingerprint but its data is not in chunks"
        raise ValueError(msg)
    if not ino.header.i_u & f.CHUNK_FORMAT_INDEXES:
        msg = f"{_p(path)} uses block-map chunk indexes (no device ids)"
        raise ValueError(msg)
    chunkbits, entries = reader.chunk_map(ino)
    pieces: list[Piece] = []
    for device_id, blkaddr in entries:
        if blkaddr == f.NULL_ADDR:
            pieces.append(None)
        elif not 1 <= device_id <= len(devices):
            msg = f"{_p(path)} has data on device {device_id}, not in a data blob"
            raise ValueError(msg)
        else:
            pieces.append((devices[device_id - 1], blkaddr * f.BLOCK))
    return value(ino.size, chunkbits, pieces)


def _inodes(reader: ImageReader) -> Iterable[tuple[bytes, Inode]]:
    """Every inode reachable from the root once (a hostile image may loop)."""
    root = reader.inode(reader.sb.root_nid)
    seen = {root.nid}
    pending = [(b"", root)]
    yield b"/", root
    while pending:
        prefix, ino = pending.pop()
        for name, nid, _ in reader.listdir(ino):
            if name in (b".", b"..") or nid in seen:
                continue
            seen.add(nid)
            child = reader.inode(nid)
            yield prefix + b"/" + name, child
            if child.is_dir:
                pending.append((prefix + b"/" + name, child))


def _fingerprints(reader: ImageReader, ino: Inode, name: bytes, prefix_id: int
                  ) -> list[bytes] | None:
    """Every inline xattr value named like the fingerprint; None if shared xattrs are used."""
    h = ino.header
    if h.xattr_icount == 0:
        return []
    primary = reader.primary
    at = ino.nid * f.SLOT_SIZE + h.isize
    end = at + f.xattr_body_size(h.xattr_icount)
    if primary[at + 4]:  # h_shared_count
        return None
    pos = at + f.XATTR_HEADER_SIZE
    out = []
    while pos < end:
        index, suffix, raw, pos = f.parse_xattr_entry(primary, pos)
        if index & f.XATTR_LONG_PREFIX:
            full = reader.prefixes[index & 0x7F] + suffix
        else:
            full = _short(index) + suffix
        if index == f.XATTR_LONG_PREFIX | prefix_id or full == name:
            out.append(raw)
    return out


def _short(index: int) -> bytes:
    return _SHORT_PREFIXES.get(index, b"\0unknown\0")


def _refuse(why: str) -> Verdict:
    return Verdict(safe=False, reason=f"fingerprints not verified: {why}")


def _p(path: bytes) -> str:
    return path.decode(errors="replace")


def _no_data(_off: int, _len: int) -> bytes:
    msg = "the fingerprint check reads no file data"
    raise AssertionError(msg)
