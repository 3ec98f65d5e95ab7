# SPDX-License-Identifier: Apache-2.0
"""A small EROFS reader for the images this package writes (checks, tests, tools).

It follows the kernel's rules for exactly the subset the builder emits:
uncompressed flat/inline/chunk-based inodes, 8-byte chunk indexes, inline
xattrs with short or long prefixes. It is no fsck: it trusts sizes it reads.
"""
from __future__ import annotations

import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ondemand_d.image import format as f
from ondemand_d.image.dirent import decode_directory

#: (offset, length) -> bytes of one extra device.
DeviceRead = Callable[[int, int], bytes]

_SHORT_PREFIXES = {
    f.XATTR_INDEX_USER: b"user.",
    f.XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    f.XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    f.XATTR_INDEX_TRUSTED: b"trusted.",
    f.XATTR_INDEX_SECURITY: b"security.",
}


@dataclass(frozen=True, slots=True)
class Inode:
    """What stat(2), getxattr(2) and the data path need of one inode."""

    nid: int
    header: f.InodeHeader
    mtime_ns: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def mode(self) -> int:
        return self.header.mode

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.header.mode)

    @property
    def body_end(self) -> int:
        """Byte offset just past the inode and its xattrs (spec §3.7)."""
        xattr_size = f.xattr_body_size(self.header.xattr_icount)
        return self.nid * f.SLOT_SIZE + self.header.isize + xattr_size


def device_tags(primary: bytes) -> list[bytes]:
    """The device-slot tags of a bootstrap: the keys the kernel OPENs in fscache mode."""
    sb = f.Superblock.from_bytes(primary[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE])
    base = f.DEVT_SLOTOFF * f.DEVICE_SLOT_SIZE
    size = f.DEVICE_SLOT_SIZE
    return [
        f.DeviceSlot.from_bytes(primary[base + i * size : base + (i + 1) * size]).tag
        for i in range(sb.extra_devices)
    ]


class ImageReader:
    """Read a bootstrap (bytes) plus its data devices (readers in slot order)."""

    def __init__(self, primary: bytes, devices: Sequence[DeviceRead] = ()) -> None:
        self.primary = primary
        self.sb = f.Superblock.from_bytes(primary[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE])
        if self.sb.feature_compat & f.COMPAT_SB_CHKSUM:
            block0 = bytearray(primary[: f.BLOCK])
            block0[f.SB_OFFSET + 4 : f.SB_OFFSET + 8] = bytes(4)
            if f.sb_checksum(bytes(block0)) != self.sb.checksum:
                msg = "superblock checksum mismatch"
                raise ValueError(msg)
        if len(devices) != self.sb.extra_devices:
            msg = f"image has {self.sb.extra_devices} extra devices, {len(devices)} given"
            raise ValueError(msg)
        self.devices = list(devices)
        self.prefixes = self._prefixes()

    def device_tags(self) -> list[bytes]:
        return device_tags(self.primary)

    # -- inodes and directories -------------------------------------------------

    def inode(self, nid: int) -> Inode:
        header = f.InodeHeader.from_bytes(self.primary, nid * f.SLOT_SIZE)
        if header.extended:
            mtime = header.mtime * 1_000_000_000 + header.mtime_nsec
        else:
            mtime = self.sb.build_time * 1_000_000_000 + self.sb.build_time_nsec
        ino = Inode(nid, header, mtime)
        ino.xattrs.update(self._xattrs(nid * f.SLOT_SIZE + header.isize, header.xattr_icount))
        return ino

    def listdir(self, ino: Inode) -> list[tuple[bytes, int, int]]:
        """(name, nid, file_type) rows, '.' and '..' included, in on-disk order."""
        return decode_directory(self.read(ino))

    def lookup(self, path: bytes) -> Inode:
        ino = self.inode(self.sb.root_nid)
        for part in (p for p in path.split(b"/") if p):
            rows = {name: nid for name, nid, _ in self.listdir(ino)}
            if part not in rows:
                raise FileNotFoundError(path.decode(errors="replace"))
            ino = self.inode(rows[part])
        return ino

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every path (root = b"/") and its inode, depth first."""
        root = self.inode(self.sb.root_nid)
        yield b"/", root
        pending = [(b"", root)]
        while pending:
            prefix, ino = pending.pop()
            for name, nid, _ in self.listdir(ino):
                if name in (b".", b".."):
                    continue
                child = self.inode(nid)
                yield prefix + b"/" + name, child
                if child.is_dir:
                    pending.append((prefix + b"/" + name, child))

    # -- data -------------------------------------------------------------------

    def read(self, ino: Inode) -> bytes:
        """All of a file's (directory's, symlink's) data."""
        h = ino.header
        if h.size == 0 or stat.S_IFMT(h.mode) in (stat.S_IFCHR, stat.S_IFBLK):
            return b""
        if h.datalayout == f.LAYOUT_CHUNK_BASED:
            return self._read_chunks(ino)
        if h.datalayout == f.LAYOUT_FLAT_PLAIN:
            return self.primary[h.i_u * f.BLOCK : h.i_u * f.BLOCK + h.size]
        full = h.size // f.BLOCK * f.BLOCK  # FLAT_INLINE: full blocks, then the tail
        head = self.primary[h.i_u * f.BLOCK : h.i_u * f.BLOCK + full] if full else b""
        return head + self.primary[ino.body_end : ino.body_end + h.size - full]

    def chunk_map(self, ino: Inode) -> tuple[int, list[tuple[int, int]]]:
        """(chunkbits, [(device_id, blkaddr), ...]) of a chunk-based inode."""
        chunk_format = ino.header.i_u & 0xFFFF
        chunkbits = f.BLKSZBITS + (chunk_format & 0x1F)
        count = -(-ino.size // (1 << chunkbits))
        start = f.align(ino.body_end, f.CHUNK_INDEX_SIZE)
        entries = [
            f.parse_chunk_index(self.primary, start + k * f.CHUNK_INDEX_SIZE) for k in range(count)
        ]
        return chunkbits, entries

    def _read_chunks(self, ino: Inode) -> bytes:
        chunkbits, entries = self.chunk_map(ino)
        size = 1 << chunkbits
        parts = []
        for k, (device_id, blkaddr) in enumerate(entries):
            length = min(size, ino.size - k * size)
            if blkaddr == f.NULL_ADDR:
                parts.append(bytes(length))
            elif device_id == 0:
                parts.append(self.primary[blkaddr * f.BLOCK : blkaddr * f.BLOCK + length])
            else:
                parts.append(self.devices[device_id - 1](blkaddr * f.BLOCK, length))
        return b"".join(parts)

    # -- xattrs -----------------------------------------------------------------

    def _prefixes(self) -> list[bytes]:
        out = []
        pos = self.sb.xattr_prefix_start * 4
        for _ in range(self.sb.xattr_prefix_count):
            length = int.from_bytes(self.primary[pos : pos + 2], "little")
            base = self.primary[pos + 2]
            infix = self.primary[pos + 3 : pos + 2 + length]
            out.append(_SHORT_PREFIXES.get(base, b"") + infix)
            pos += f.align(2 + length, 4)
        return out

    def _xattrs(self, at: int, icount: int) -> dict[bytes, bytes]:
        if icount == 0:
            return {}
        end = at + f.xattr_body_size(icount)
        pos = at + f.XATTR_HEADER_SIZE + 4 * self.primary[at + 4]  # skip shared ids
        out: dict[bytes, bytes] = {}
        while pos < end:
            index, name, value, pos = f.parse_xattr_entry(self.primary, pos)
            if index & f.XATTR_LONG_PREFIX:
                prefix = self.prefixes[index & 0x7F]
            else:
                prefix = _SHORT_PREFIXES[index]
            out[prefix + name] = value
        return out
