# SPDX-License-Identifier: Apache-2.0
"""wire.py: golden bytes built with struct, round trips, and every malformed shape."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ondemand_d import wire
from ondemand_d.errors import ProtocolError

U32 = st.integers(0, 2**32 - 1)


def test_open_golden_bytes():
    """The spec's worked example: fsid=img1 gives a 47-byte OPEN."""
    raw = struct.pack("=IIII", 5, 0, 47, 1) + struct.pack("=IIII", 11, 4, 9, 0) + b"erofs,img1\0img1"
    req = wire.parse(raw)
    assert req == wire.OpenRequest(5, 1, b"erofs,img1", b"img1", 9, 0)
    assert wire.build(req) == raw


def test_read_and_close_golden_bytes():
    read = struct.pack("=IIII", 7, 2, 32, 3) + struct.pack("=QQ", 1 << 40, 131072)
    assert wire.parse(read) == wire.ReadRequest(7, 3, 1 << 40, 131072)
    close = struct.pack("=IIII", 8, 1, 16, 3)
    assert wire.parse(close) == wire.CloseRequest(8, 3)


@given(U32, st.integers(1, 2**31 - 1), st.binary(max_size=255), st.binary(min_size=1, max_size=255),
       U32)
def test_open_round_trip(msg_id, object_id, volume, cookie, fd):
    req = wire.OpenRequest(msg_id, object_id, volume.replace(b"\0", b"_"), cookie, fd, 0)
    raw = wire.build(req)
    assert len(raw) == 32 + len(req.volume_key) + 1 + len(cookie)
    assert wire.parse(raw) == req


@given(U32, U32, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_read_round_trip(msg_id, object_id, off, length):
    req = wire.ReadRequest(msg_id, object_id, off, length)
    assert wire.parse(wire.build(req)) == req


@given(st.binary(max_size=1100))
def test_arbitrary_bytes_parse_or_raise_protocol_error(raw):
    """Nothing the kernel (or a fuzzer) sends crashes the parser with another exception."""
    try:
        req = wire.parse(raw)
    except ProtocolError:
        return
    assert wire.build(req) == raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\0" * 15, "shorter than"),
        (struct.pack("=IIII", 1, 2, 40, 1) + b"\0" * 16, "header says 40"),
        (struct.pack("=IIII", 1, 2, 24, 1) + b"\0" * 8, "READ of 24"),
        (struct.pack("=IIII", 1, 1, 20, 1) + b"\0" * 4, "CLOSE of 20"),
        (struct.pack("=IIII", 1, 9, 16, 1), "unknown opcode 9"),
        (struct.pack("=IIII", 1, 0, 24, 1) + b"\0" * 8, "shorter than its 32"),
        (struct.pack("=IIII", 1, 0, 40, 1) + struct.pack("=IIII", 200, 4, 3, 0) + b"abcdefgh",
         "do not fill"),
        (struct.pack("=IIII", 1, 0, 40, 1) + struct.pack("=IIII", 4, 4, 3, 0) + b"abcdefgh",
         "does not end in NUL"),
        (struct.pack("=IIII", 1, 0, 1100, 1) + b"\0" * 1084, "exceeds"),
    ],
)
def test_malformed(raw, reason):
    with pytest.raises(ProtocolError, match=reason) as info:
        wire.parse(raw)
    if len(raw) >= 16 and len(raw) <= 1024:
        assert info.value.msg_id == 1


def test_odd_length_open_and_empty_volume_rejected():
    raw = wire.build(wire.OpenRequest(1, 1, b"erofs,a", b"xyz", 3, 0))
    assert len(raw) % 2 == 1 and wire.parse(raw).cookie_key == b"xyz"
    no_volume = struct.pack("=IIII", 1, 0, 33, 1) + struct.pack("=IIII", 0, 1, 3, 0) + b"k"
    with pytest.raises(ProtocolError, match="NUL"):
        wire.parse(no_volume)


@pytest.mark.parametrize(("msg_id", "size", "text"),
                         [(0, 0, b"copen 0,0"), (8, 4096, b"copen 8,4096"), (10, -2, b"copen 10,-2")])
def test_format_copen(msg_id, size, text):
    assert wire.format_copen(msg_id, size) == text


@pytest.mark.parametrize("size", [-4096, -(2**40)])
def test_format_copen_refuses_non_errno(size):
    with pytest.raises(ValueError, match="out of range"):
        wire.format_copen(1, size)


def test_ioctl_number_matches_iow():
    iow = (1 << 30) | (4 << 16) | (0x98 << 8) | 1
    assert wire.CACHEFILES_IOC_READ_COMPLETE == iow


def test_split_volume_key():
    assert wire.split_volume_key(b"erofs,dom") == b"dom"
    assert wire.split_volume_key(b"other") == b"other"
