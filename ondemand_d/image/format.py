# SPDX-License-Identifier: Apache-2.0
"""EROFS on-disk structures for uncompressed, chunk-based, multi-device images.

Pure values and bytes, no I/O. Every layout mirrors `fs/erofs/erofs_fs.h` as of
Linux 6.12 and is cited from the project's spec (shared/spec/erofs-format.md,
"spec §N" below). All integers are little-endian.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

BLKSZBITS = 12
BLOCK = 1 << BLKSZBITS
SB_OFFSET = 1024  # spec §2: the superblock is at byte 1024 of the primary device
EROFS_MAGIC = 0xE0F5E1E2
SLOT_SIZE = 32  # spec §3.1: nid * 32 is an inode's byte offset (meta_blkaddr = 0)
DEVT_SLOTOFF = 9  # spec §6.1: device table at 9 * 128 = 1152, right after the SB
NULL_ADDR = 0xFFFFFFFF  # spec §5.3: an unmapped chunk (a hole), or "no full blocks"
MAX_CHUNKBITS = BLKSZBITS + 31  # spec §5.1: the chunk format keeps 5 bits
MAX_NAME = 255  # spec §4.1

# spec §2.2
COMPAT_SB_CHKSUM = 0x01
COMPAT_MTIME = 0x02
COMPAT_PLAIN_XATTR_PFX = 0x10
COMPAT_ISHARE_XATTRS = 0x20
INCOMPAT_CHUNKED_FILE = 0x04
INCOMPAT_DEVICE_TABLE = 0x08
INCOMPAT_XATTR_PREFIXES = 0x40

# spec §3.2: i_format = version | (datalayout << 1)
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
CHUNK_FORMAT_INDEXES = 0x20  # spec §5.1: 8-byte indexes carrying a device_id

# spec §4.1: dirent file_type (Linux FT_*)
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = 1, 2, 3, 4, 5, 6, 7

# spec §8.1: e_name_index of the short prefixes we write
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6
XATTR_LONG_PREFIX = 0x80  # spec §8.4: 0x80 | i names long prefix i

_SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQBB22s")  # spec §2.1, 128 bytes
_DEVICE_SLOT = struct.Struct("<64sII56s")  # spec §6.1, 128 bytes
_COMPACT = struct.Struct("<HHHHIIIIHHI")  # spec §3.3, 32 bytes
_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")  # spec §3.4, 64 bytes
_DIRENT = struct.Struct("<QHBB")  # spec §4.1, 12 bytes
_CHUNK_INDEX = struct.Struct("<HHI")  # spec §5.3, 8 bytes
_XATTR_HEADER = struct.Struct("<IB7s")  # spec §8.1, 12 bytes
_XATTR_ENTRY = struct.Struct("<BBH")  # spec §8.1, 4 bytes
_PREFIX = struct.Struct("<HB")  # spec §8.4, then the infix, padded to 4

SUPERBLOCK_SIZE = _SUPERBLOCK.size
DEVICE_SLOT_SIZE = _DEVICE_SLOT.size
COMPACT_SIZE = _COMPACT.size
EXTENDED_SIZE = _EXTENDED.size
DIRENT_SIZE = _DIRENT.size
CHUNK_INDEX_SIZE = _CHUNK_INDEX.size
XATTR_HEADER_SIZE = _XATTR_HEADER.size


def align(value: int, unit: int) -> int:
    """Round `value` up to a multiple of `unit`."""
    return -(-value // unit) * unit


@dataclass(frozen=True, slots=True)
class Superblock:
    """`struct erofs_super_block` (spec §2.1); unlisted fields are written as 0."""

    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    uuid: bytes = bytes(16)
    volume_name: bytes = b""
    feature_compat: int = COMPAT_MTIME
    feature_incompat: int = 0
    extra_devices: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    ishare_xattr_prefix_id: int = 0
    checksum: int = 0

    def __bytes__(self) -> bytes:
        if self.root_nid >= 1 << 16:  # spec §2.1: root_nid is only 16 bits
            msg = f"root nid {self.root_nid} does not fit the superblock's 16 bits"
            raise ValueError(msg)
        if len(self.volume_name) > 15:  # noqa: PLR2004 - spec §2.1: 6.12 needs a NUL inside
            msg = "volume name longer than 15 bytes"
            raise ValueError(msg)
        return _SUPERBLOCK.pack(
            EROFS_MAGIC, self.checksum, self.feature_compat, BLKSZBITS, 0, self.root_nid,
            self.inos, self.build_time, self.build_time_nsec, self.blocks, 0, 0,
            self.uuid, self.volume_name, self.feature_incompat, 0, self.extra_devices,
            DEVT_SLOTOFF if self.extra_devices else 0, 0, self.xattr_prefix_count,
            self.xattr_prefix_start, 0, 0, self.ishare_xattr_prefix_id, bytes(22),
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Superblock:
        f = _SUPERBLOCK.unpack_from(raw)
        if f[0] != EROFS_MAGIC:
            msg = f"bad EROFS magic {f[0]:#x}"
            raise ValueError(msg)
        return cls(
            root_nid=f[5], inos=f[6], build_time=f[7], build_time_nsec=f[8], blocks=f[9],
            uuid=f[12], volume_name=f[13].rstrip(b"\0"), feature_compat=f[2],
            feature_incompat=f[14], extra_devices=f[16], xattr_prefix_count=f[19],
            xattr_prefix_start=f[20], ishare_xattr_prefix_id=f[23], checksum=f[1],
        )


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """`struct erofs_deviceslot` (spec §6.1): tag, size in blocks, unified start."""

    tag: bytes
    blocks: int
    mapped_blkaddr: int

    def __bytes__(self) -> bytes:
        if len(self.tag) > 64:  # noqa: PLR2004 - the tag field is 64 bytes, NUL optional
            msg = f"device tag of {len(self.tag)} bytes (at most 64)"
            raise ValueError(msg)
        return _DEVICE_SLOT.pack(self.tag, self.blocks, self.mapped_blkaddr, bytes(56))

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeviceSlot:
        tag, blocks, mapped, _ = _DEVICE_SLOT.unpack_from(raw)
        return cls(tag.rstrip(b"\0"), blocks, mapped)


@dataclass(frozen=True, slots=True)
class InodeHeader:
    """The fixed part of an inode, compact (32 B) or extended (64 B) (spec §3.3-3.5).

    `i_u` is the raw union: a block address, a chunk format, or an encoded rdev
    (spec §3.6). Compact inodes carry no time of their own: they show the
    superblock's build time, so the caller picks `extended` when they differ.
    """

    extended: bool
    datalayout: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int = 0
    mtime_nsec: int = 0

    @property
    def isize(self) -> int:
        return EXTENDED_SIZE if self.extended else COMPACT_SIZE

    def __bytes__(self) -> bytes:
        i_format = int(self.extended) | (self.datalayout << 1)
        if self.extended:
            return _EXTENDED.pack(
                i_format, self.xattr_icount, self.mode, 0, self.size, self.i_u,
                self.ino & 0xFFFFFFFF, self.uid, self.gid, self.mtime, self.mtime_nsec,
                self.nlink, bytes(16),
            )
        # spec §3.3: +0x0C i_reserved stays 0 (newer kernels add it to the epoch).
        return _COMPACT.pack(
            i_format, self.xattr_icount, self.mode, self.nlink, self.size, 0, self.i_u,
            self.ino & 0xFFFFFFFF, self.uid, self.gid, 0,
        )

    @classmethod
    def from_bytes(cls, raw: bytes, offset: int = 0) -> InodeHeader:
        (i_format,) = struct.unpack_from("<H", raw, offset)
        layout = (i_format >> 1) & 0x7
        if i_format & 1:
            f = _EXTENDED.unpack_from(raw, offset)
            return cls(True, layout, f[1], f[2], f[11], f[4], f[5], f[6], f[7], f[8], f[9], f[10])
        f = _COMPACT.unpack_from(raw, offset)
        return cls(False, layout, f[1], f[2], f[3], f[4], f[6], f[7], f[8], f[9])


def needs_extended(
    *, size: int, uid: int, gid: int, nlink: int, mtime: tuple[int, int], epoch: tuple[int, int]
) -> bool:
    """Spec §3.5: the rule for when a compact inode cannot describe the file."""
    return size > 0xFFFFFFFF or max(uid, gid, nlink) > 0xFFFF or mtime != epoch  # noqa: PLR2004


def encode_rdev(major: int, minor: int) -> int:
    """Linux `new_encode_dev` (spec §3.6), as i_u of a char/block device."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def chunk_format(chunkbits: int) -> int:
    """Spec §5.1: i_u of a chunk-based inode with 8-byte indexes."""
    if not BLKSZBITS <= chunkbits <= MAX_CHUNKBITS:
        msg = f"chunk size 2^{chunkbits} outside 2^{BLKSZBITS}..2^{MAX_CHUNKBITS}"
        raise ValueError(msg)
    return CHUNK_FORMAT_INDEXES | (chunkbits - BLKSZBITS)


def chunk_index(device_id: int, blkaddr: int) -> bytes:
    """`struct erofs_inode_chunk_index` (spec §5.3); advise stays 0."""
    return _CHUNK_INDEX.pack(0, device_id, blkaddr)


HOLE_INDEX = chunk_index(0, NULL_ADDR)


def parse_chunk_index(raw: bytes, offset: int = 0) -> tuple[int, int]:
    """Return (device_id, blkaddr) of the index at `offset`."""
    _, device_id, blkaddr = _CHUNK_INDEX.unpack_from(raw, offset)
    return device_id, blkaddr


def dirent(nid: int, nameoff: int, file_type: int) -> bytes:
    """`struct erofs_dirent` (spec §4.1)."""
    return _DIRENT.pack(nid, nameoff, file_type, 0)


def parse_dirent(raw: bytes, offset: int = 0) -> tuple[int, int, int]:
    """Return (nid, nameoff, file_type) of the dirent at `offset`."""
    nid, nameoff, file_type, _ = _DIRENT.unpack_from(raw, offset)
    return nid, nameoff, file_type


def xattr_header() -> bytes:
    """`erofs_xattr_ibody_header` (spec §8.1) with no filter and no shared xattrs."""
    return _XATTR_HEADER.pack(0, 0, bytes(7))


def xattr_entry(name_index: int, name: bytes, value: bytes) -> bytes:
    """An inline `erofs_xattr_entry` with its name and value, padded to 4 (spec §8.1)."""
    if len(name) > 255 or len(value) > 0xFFFF:  # noqa: PLR2004
        msg = f"xattr name suffix {len(name)} B / value {len(value)} B over 255 / 65535"
        raise ValueError(msg)
    raw = _XATTR_ENTRY.pack(len(name), name_index, len(value)) + name + value
    return raw + bytes(align(len(raw), 4) - len(raw))


def parse_xattr_entry(raw: bytes, offset: int) -> tuple[int, bytes, bytes, int]:
    """Return (name_index, name, value, offset of the next entry)."""
    name_len, index, value_len = _XATTR_ENTRY.unpack_from(raw, offset)
    start = offset + _XATTR_ENTRY.size
    name = raw[start : start + name_len]
    value = raw[start + name_len : start + name_len + value_len]
    return index, name, value, offset + align(_XATTR_ENTRY.size + name_len + value_len, 4)


def xattr_icount(body_len: int) -> int:
    """Spec §8.1: icount for an inline body of `body_len` bytes (0 = no xattrs)."""
    return 0 if body_len == 0 else 1 + (body_len - XATTR_HEADER_SIZE) // 4


def xattr_body_size(icount: int) -> int:
    return 0 if icount == 0 else XATTR_HEADER_SIZE + 4 * (icount - 1)


def long_prefix(base_index: int, infix: bytes) -> bytes:
    """A long xattr name prefix record (spec §8.4), padded to 4 bytes."""
    if not 0 <= len(infix) <= 255:  # noqa: PLR2004 - record len = 1 + infix, 1..256
        msg = f"xattr prefix infix of {len(infix)} bytes"
        raise ValueError(msg)
    raw = _PREFIX.pack(1 + len(infix), base_index) + infix
    return raw + bytes(align(len(raw), 4) - len(raw))


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def sb_checksum(block0: bytes) -> int:
    """Spec §2.3: Linux crc32c(~0, ...) over [1024, 4096), no final XOR.

    `block0` is the first block with the checksum field already zeroed.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in block0[SB_OFFSET:BLOCK]:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
