# SPDX-License-Identifier: Apache-2.0
"""On-disk structs against the spec's worked example (§9) and erofs-utils' own bytes."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ondemand_d.image import format as f
from ondemand_d.image.xattrs import FingerprintPrefix, inline_body, split_name


def test_superblock_matches_worked_example() -> None:
    """Spec §9: the superblock of the 'demo' image, byte for byte."""
    sb = f.Superblock(
        root_nid=40,
        inos=4,
        build_time=1700000000,
        build_time_nsec=0,
        blocks=1,
        uuid=bytes(range(16)),
        volume_name=b"demo",
        feature_compat=f.COMPAT_SB_CHKSUM | f.COMPAT_MTIME,
        feature_incompat=f.INCOMPAT_CHUNKED_FILE | f.INCOMPAT_DEVICE_TABLE,
        extra_devices=1,
        checksum=0x3525D511,
    )
    want = bytes.fromhex(
        "e2e1f5e0 11d52535 03000000 0c002800"
        "04000000 00000000 00f15365 00000000"
        "00000000 01000000 00000000 00000000"
        "00010203 04050607 08090a0b 0c0d0e0f"
        "64656d6f 00000000 00000000 00000000"
        "0c000000 00000100 09000000 00000000"
    ) + bytes(32)
    assert bytes(sb) == want
    assert f.Superblock.from_bytes(want) == sb


def test_device_slot_and_inodes_match_worked_example() -> None:
    """Spec §9: device slot, root dir inode, chunk-based inode and its indexes."""
    slot = bytes(f.DeviceSlot(b"blob0", 0x300, 1))
    assert slot[:5] == b"blob0" and slot[0x40:0x48] == bytes.fromhex("0003000001000000")
    assert len(slot) == 128 and not any(slot[5:0x40]) and not any(slot[0x48:])
    root = f.InodeHeader(False, f.LAYOUT_FLAT_INLINE, 0, 0o40755, 3, 82, f.NULL_ADDR, 0, 0, 0)
    assert bytes(root) == bytes.fromhex(
        "04000000ed4103005200000000000000ffffffff000000000000000000000000"
    )
    big = f.InodeHeader(
        False, f.LAYOUT_CHUNK_BASED, 0, 0o100644, 1, 0x300000, f.chunk_format(20), 1, 0, 0
    )
    assert bytes(big) == bytes.fromhex(
        "08000000a481010000003000000000002800000001000000" + "00" * 8
    )
    assert f.chunk_index(1, 0x100) == bytes.fromhex("0000010000010000")
    assert bytes.fromhex("00000000ffffffff") == f.HOLE_INDEX
    assert f.dirent(40, 60, f.FT_DIR) == bytes.fromhex("28000000000000003c000200")


def test_extended_inode_layout() -> None:
    """Spec §3.4: 64 bytes, 32-bit ids, own mtime and nlink."""
    h = f.InodeHeader(
        True,
        f.LAYOUT_FLAT_PLAIN,
        0,
        0o100600,
        70000,
        1 << 33,
        0,
        5,
        100000,
        200000,
        1700000000,
        123,
    )
    raw = bytes(h)
    assert len(raw) == 64
    assert struct.unpack_from("<HHHHQIIIIQII", raw) == (
        1,
        0,
        0o100600,
        0,
        1 << 33,
        0,
        5,
        100000,
        200000,
        1700000000,
        123,
        70000,
    )


@given(
    extended=st.booleans(),
    layout=st.sampled_from([0, 2, 4]),
    icount=st.integers(0, 0xFFFF),
    mode=st.integers(0, 0xFFFF),
    nlink=st.integers(0, 0xFFFF),
    size=st.integers(0, 2**32 - 1),
    i_u=st.integers(0, 2**32 - 1),
    uid=st.integers(0, 0xFFFF),
    gid=st.integers(0, 0xFFFF),
)
def test_inode_round_trip(
    extended: bool,
    layout: int,
    icount: int,
    mode: int,
    nlink: int,
    size: int,
    i_u: int,
    uid: int,
    gid: int,
) -> None:
    """Any inode header parses back to itself (compact drops time, which it cannot hold)."""
    h = f.InodeHeader(
        extended,
        layout,
        icount,
        mode,
        nlink,
        size,
        i_u,
        7,
        uid,
        gid,
        99 if extended else 0,
        5 if extended else 0,
    )
    assert f.InodeHeader.from_bytes(bytes(h)) == h
    assert len(bytes(h)) == h.isize


def test_needs_extended_rule() -> None:
    """Spec §3.5: size, ids, nlink or a time other than the epoch."""
    base = {"size": 1, "uid": 0, "gid": 0, "nlink": 1, "mtime": (5, 0), "epoch": (5, 0)}
    assert not f.needs_extended(**base)  # type: ignore[arg-type]
    for key, value in [
        ("size", 1 << 32),
        ("uid", 65536),
        ("gid", 65536),
        ("nlink", 65536),
        ("mtime", (5, 1)),
    ]:
        assert f.needs_extended(**{**base, key: value})  # type: ignore[arg-type]


def test_rdev_and_chunk_format() -> None:
    """Spec §3.6 and §5.1 examples."""
    assert f.encode_rdev(1, 3) == 0x103
    assert f.encode_rdev(259, 70000) == (70000 & 0xFF) | (259 << 8) | ((70000 & ~0xFF) << 12)
    assert f.chunk_format(20) == 0x28 and f.chunk_format(16) == 0x24
    assert f.chunk_format(f.MAX_CHUNKBITS) == 0x3F


def test_xattr_bytes_match_mkfs() -> None:
    """Spec §8.1: mkfs.erofs 1.5 writes user.foo=bar as a 24-byte body."""
    body, dropped = inline_body({b"user.foo": b"bar", b"system.other": b"x"})
    assert body == bytes(12) + bytes.fromhex("03010300") + b"foobar" + bytes(2)
    assert dropped == 1
    assert f.xattr_icount(len(body)) == 4
    assert split_name(b"system.posix_acl_access") == (2, b"")
    assert split_name(b"security.selinux") == (6, b"selinux")
    assert split_name(b"user.") is None


def test_fingerprint_prefix_records() -> None:
    """Spec §8.4/§8.5: the records erofs-utils 1.9.3 writes for both name choices."""
    assert FingerprintPrefix(b"trusted.erofs.fingerprint").record() == (
        bytes.fromhex("120004") + b"erofs.fingerprint"  # 20 bytes: already 4-aligned
    )
    assert FingerprintPrefix().record() == bytes.fromhex(
        "150000"
    ) + b"erofs.fingerprint.v1" + bytes(1)
    body, _ = inline_body({}, FingerprintPrefix.value(bytes(32)), prefix_id=0)
    assert body[12:16] == bytes.fromhex("00802700") and body[16:23] == b"sha256:"


def test_sb_checksum_matches_mkfs(tmp_path: Path) -> None:
    """Spec §2.3: our crc32c equals what mkfs.erofs 1.5 stores."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    image = tmp_path / "img"
    subprocess.run(
        ["mkfs.erofs", "-T1700000000", str(image), str(src)], check=True, capture_output=True
    )
    block0 = bytearray(image.read_bytes()[: f.BLOCK])
    stored = struct.unpack_from("<I", block0, f.SB_OFFSET + 4)[0]
    assert f.Superblock.from_bytes(bytes(block0[f.SB_OFFSET :])).feature_compat & f.COMPAT_SB_CHKSUM
    block0[f.SB_OFFSET + 4 : f.SB_OFFSET + 8] = bytes(4)
    assert f.sb_checksum(bytes(block0)) == stored
