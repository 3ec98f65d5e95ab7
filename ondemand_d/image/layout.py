# SPDX-License-Identifier: Apache-2.0
"""Lay out and serialize the bootstrap: superblock, device table, inodes, directories.

Data placement is already decided (chunking.py), so every metadata size is
known before any nid is handed out (spec §10): first size each inode, then
place inodes from the end of the fixed header (root first, so its nid fits 16
bits), then give multi-block directories their full blocks after the inode
area, and only then write bytes.
"""
from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field, replace

from ondemand_d.errors import ImageError
from ondemand_d.image import format as f
from ondemand_d.image.chunking import FileChunks
from ondemand_d.image.dirent import encode_directory
from ondemand_d.image.tree import Node
from ondemand_d.image.xattrs import FingerprintPrefix, inline_body

_FILE_TYPES = {
    stat.S_IFREG: f.FT_REG, stat.S_IFDIR: f.FT_DIR, stat.S_IFCHR: f.FT_CHR,
    stat.S_IFBLK: f.FT_BLK, stat.S_IFIFO: f.FT_FIFO, stat.S_IFSOCK: f.FT_SOCK,
    stat.S_IFLNK: f.FT_LNK,
}


@dataclass(frozen=True, slots=True)
class Device:
    """One extra device (data blob) as the device table will list it."""

    tag: str
    blocks: int


@dataclass(slots=True)
class _Inode:
    node: Node
    ino: int
    parent: _Inode | None = None
    nlink: int = 0
    entries: list[tuple[bytes, _Inode]] = field(default_factory=list)  # dirs, sorted
    xattrs: bytes = b""
    header: f.InodeHeader | None = None
    flat: bytes = b""  # dir/symlink/inline-file data
    inline: bool = False  # FLAT_INLINE: tail after the inode, full blocks at blkaddr
    chunks: FileChunks | None = None  # chunk-based regular files
    blkaddr: int = f.NULL_ADDR
    nid: int = 0

    @property
    def meta_size(self) -> int:
        """Bytes from the inode start to the end of what follows it (spec §3.7)."""
        assert self.header is not None
        end = self.header.isize + len(self.xattrs)
        if self.chunks is not None:
            return f.align(end, f.CHUNK_INDEX_SIZE) + f.CHUNK_INDEX_SIZE * len(self.chunks.refs)
        return end + (len(self.flat) % f.BLOCK if self.inline else 0)


@dataclass(slots=True)
class LayoutStats:
    inodes: int = 0
    xattrs_dropped: int = 0
    bootstrap_bytes: int = 0


def build_bootstrap(
    root: Node,
    *,
    placements: dict[int, FileChunks | bytes],
    devices: list[Device],
    device_of: dict[str, int],
    epoch: tuple[int, int],
    fingerprint: FingerprintPrefix | None = None,
    fingerprints: dict[int, bytes] | None = None,
) -> tuple[bytes, LayoutStats]:
    """Serialize the primary device for `root`.

    Args:
        root: the tree's root directory.
        placements: per regular file (keyed by id(node)), its chunk map, or its
            bytes if it is small enough to live inline in the bootstrap.
        devices: the data blobs in device-table order (device_id = index + 1).
        device_of: blob id -> device_id, for the chunk indexes.
        epoch: (seconds, nanoseconds) shown by every compact inode.
        fingerprint: write per-file fingerprint xattrs under this prefix.
        fingerprints: their values (fingerprint.py), keyed by id(node); a file
            without one gets none.
    """
    stats = LayoutStats()
    inodes = _collect(root)
    stats.inodes = len(inodes)
    prefix_table = fingerprint.record() if fingerprint else b""
    for ino in inodes:
        value = (fingerprints or {}).get(id(ino.node)) if fingerprint else None
        _describe(ino, placements, epoch, value, stats)
    # Fixed header: SB at 1024, device table at slot 9, prefix table after it.
    devt_end = f.DEVT_SLOTOFF * f.DEVICE_SLOT_SIZE + f.DEVICE_SLOT_SIZE * len(devices)
    prefix_start = f.align(devt_end, 4)
    pos = f.align(prefix_start + len(prefix_table), f.SLOT_SIZE)
    for ino in inodes:
        pos = _place(ino, pos)
    # At least one byte of slack after the last inode: fsck.erofs 1.5 reads a 12-byte
    # xattr header after every inode, even one without xattrs, and calls an image whose
    # last inode ends at its last byte corrupt (the kernel does not read there).
    data_block = f.align(pos + 1, f.BLOCK) // f.BLOCK
    for ino in inodes:
        if ino.flat and (full := _full_blocks(ino)):
            ino.blkaddr, data_block = data_block, data_block + full
    image = bytearray(data_block * f.BLOCK)
    for ino in inodes:
        _serialize(ino, image, device_of)
    uses_chunks = any(i.chunks is not None for i in inodes)
    for i, dev in enumerate(devices):
        at = (f.DEVT_SLOTOFF + i) * f.DEVICE_SLOT_SIZE
        # mapped_blkaddr cumulative after the primary: flat (concatenated) mounts work too.
        mapped = data_block + sum(d.blocks for d in devices[:i])
        slot = f.DeviceSlot(dev.tag.encode(), dev.blocks, mapped)
        image[at : at + f.DEVICE_SLOT_SIZE] = bytes(slot)
    image[prefix_start : prefix_start + len(prefix_table)] = prefix_table
    sb = f.Superblock(
        root_nid=inodes[0].nid, inos=len(inodes), build_time=epoch[0], build_time_nsec=epoch[1],
        blocks=data_block,
        feature_compat=f.COMPAT_MTIME | f.COMPAT_SB_CHKSUM
        | (f.COMPAT_PLAIN_XATTR_PFX | f.COMPAT_ISHARE_XATTRS if fingerprint else 0),
        feature_incompat=(f.INCOMPAT_CHUNKED_FILE if uses_chunks else 0)
        | (f.INCOMPAT_DEVICE_TABLE if devices else 0)
        | (f.INCOMPAT_XATTR_PREFIXES if fingerprint else 0),
        extra_devices=len(devices),
        xattr_prefix_count=1 if fingerprint else 0,
        xattr_prefix_start=prefix_start // 4 if fingerprint else 0,
    )
    # The uuid (statfs f_fsid) is derived from the content, so it is reproducible.
    _put_sb(image, sb)
    uuid = hashlib.sha256(image).digest()[:16]
    _put_sb(image, sb, uuid=uuid)
    stats.bootstrap_bytes = len(image)
    return bytes(image), stats


def _put_sb(image: bytearray, sb: f.Superblock, uuid: bytes = bytes(16)) -> None:
    raw = bytes(replace(sb, uuid=uuid, checksum=0))
    image[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE] = raw
    crc = f.sb_checksum(bytes(image[: f.BLOCK]))  # spec §2.3: computed last
    raw = bytes(replace(sb, uuid=uuid, checksum=crc))
    image[f.SB_OFFSET : f.SB_OFFSET + f.SUPERBLOCK_SIZE] = raw


def _collect(root: Node) -> list[_Inode]:
    """Give out inodes root first, then directory by directory, names sorted."""
    top = _Inode(root, 1)
    top.parent = top
    inodes = [top]
    seen: dict[int, _Inode] = {id(root): top}
    pending = [top]
    while pending:
        d = pending.pop()
        for name, child in sorted(d.node.children.items()):
            ino = seen.get(id(child))
            if ino is None:
                ino = _Inode(child, len(inodes) + 1, parent=d)
                seen[id(child)] = ino
                inodes.append(ino)
            d.entries.append((name, ino))
            ino.nlink += 1
        pending.extend(i for _, i in reversed(d.entries) if i.node.is_dir)
    for ino in inodes:  # spec §4.2: a directory has 2 + subdirectories links
        if ino.node.is_dir:
            ino.nlink = 2 + sum(1 for _, c in ino.entries if c.node.is_dir)
    return inodes


def _describe(
    ino: _Inode,
    placements: dict[int, FileChunks | bytes],
    epoch: tuple[int, int],
    value: bytes | None,
    stats: LayoutStats,
) -> None:
    """Choose layout, size and xattrs of one inode; nothing is placed yet."""
    node = ino.node
    i_u = 0
    layout = f.LAYOUT_FLAT_PLAIN
    if node.fmt == stat.S_IFDIR:
        ino.flat = encode_directory(_dirents(ino, placeholder=True))
    elif node.fmt == stat.S_IFLNK:
        ino.flat = node.target
    elif node.fmt in (stat.S_IFCHR, stat.S_IFBLK):
        major, minor = node.rdev
        if major >= 1 << 12 or minor >= 1 << 20:
            msg = f"device number {major}:{minor} does not fit the 32-bit EROFS encoding"
            raise ImageError(msg)
        i_u = f.encode_rdev(major, minor)
    elif node.fmt == stat.S_IFREG and node.size:
        placed = placements[id(node)]
        if isinstance(placed, bytes):
            ino.flat = placed
        else:
            ino.chunks = placed
            layout, i_u = f.LAYOUT_CHUNK_BASED, f.chunk_format(placed.chunkbits)
    xattrs = node.xattrs
    if node.fmt not in (stat.S_IFREG, stat.S_IFDIR):
        # The VFS never returns user.* xattrs of other inode types (ENODATA), and
        # no Linux filesystem can hold them there, so drop them like other strays.
        xattrs = {k: v for k, v in xattrs.items() if not k.startswith(b"user.")}
    ino.xattrs, dropped = inline_body(xattrs, value)
    stats.xattrs_dropped += dropped + len(node.xattrs) - len(xattrs)
    icount = f.xattr_icount(len(ino.xattrs))
    if icount > 0xFFFF:  # noqa: PLR2004 - i_xattr_icount is a u16
        msg = f"{len(ino.xattrs)} bytes of xattrs on one inode; EROFS keeps at most 256 KiB inline"
        raise ImageError(msg)
    size = len(ino.flat) if ino.flat else node.size
    extended = f.needs_extended(
        size=size, uid=node.uid, gid=node.gid, nlink=ino.nlink, mtime=node.mtime, epoch=epoch
    )
    isize = f.EXTENDED_SIZE if extended else f.COMPACT_SIZE
    tail = size % f.BLOCK
    # spec §3.8: inline only a partial last block, and only if it can fit one block.
    if ino.flat and tail and isize + len(ino.xattrs) + tail <= f.BLOCK:
        layout, ino.inline = f.LAYOUT_FLAT_INLINE, True
    ino.header = f.InodeHeader(
        extended, layout, icount, node.fmt | node.mode, ino.nlink, size, i_u, ino.ino,
        node.uid, node.gid, *node.mtime,
    )


def _place(ino: _Inode, pos: int) -> int:
    """Give `ino` its nid at or after `pos`; return where the next inode may go."""
    assert ino.header is not None
    if ino.inline:
        tail_at = pos + ino.header.isize + len(ino.xattrs)
        if tail_at % f.BLOCK + len(ino.flat) % f.BLOCK > f.BLOCK:
            pos = f.align(pos, f.BLOCK)  # spec §3.8: the tail may not cross a block
    ino.nid = pos // f.SLOT_SIZE
    return f.align(pos + ino.meta_size, f.SLOT_SIZE)


def _full_blocks(ino: _Inode) -> int:
    """Blocks of flat data kept outside the inode (all of it unless inline)."""
    return len(ino.flat) // f.BLOCK if ino.inline else f.align(len(ino.flat), f.BLOCK) // f.BLOCK


def _dirents(ino: _Inode, *, placeholder: bool = False) -> list[tuple[bytes, int, int]]:
    assert ino.parent is not None
    rows = [(b".", ino.nid, f.FT_DIR), (b"..", ino.parent.nid, f.FT_DIR)]
    rows += [(n, c.nid, _FILE_TYPES[c.node.fmt]) for n, c in ino.entries]
    if placeholder:
        rows = [(n, 0, t) for n, _, t in rows]
    return sorted(rows)  # spec §4.2: bytewise across the whole directory, dots included


def _serialize(ino: _Inode, image: bytearray, device_of: dict[str, int]) -> None:
    header = ino.header
    assert header is not None
    if ino.node.is_dir:
        ino.flat = encode_directory(_dirents(ino))  # the nids are known now
    # Flat data: its first full block, NULL_ADDR if all inline (spec §3.6).
    i_u = ino.blkaddr if ino.flat else header.i_u
    at = ino.nid * f.SLOT_SIZE
    raw = bytes(replace(header, i_u=i_u)) + ino.xattrs
    image[at : at + len(raw)] = raw
    end = at + len(raw)
    if ino.chunks is not None:
        end = f.align(end, f.CHUNK_INDEX_SIZE)  # spec §12.1: the 4-byte pad after xattrs
        for ref in ino.chunks.refs:
            entry = (
                f.HOLE_INDEX
                if ref is None
                else f.chunk_index(device_of[ref.blob_id], ref.offset // f.BLOCK)
            )
            image[end : end + f.CHUNK_INDEX_SIZE] = entry
            end += f.CHUNK_INDEX_SIZE
    elif ino.flat:
        full = len(ino.flat) // f.BLOCK * f.BLOCK if ino.inline else len(ino.flat)
        if ino.inline:
            tail = ino.flat[full:]
            image[end : end + len(tail)] = tail
        if full:
            start = ino.blkaddr * f.BLOCK
            image[start : start + full] = ino.flat[:full]
