# SPDX-License-Identifier: Apache-2.0
"""The fanotify event and response records, against bytes built with struct here."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ondemand_d.fanotify import layout, uapi


def event(fd: int, offset: int, count: int, pid: int = 77, mask: int = 0x100000,
          vers: int = 3) -> bytes:
    """struct fanotify_event_metadata (24 bytes) + a range info record (24 bytes)."""
    meta = struct.pack("=IBBHQii", 48, vers, 0, 24, mask, fd, pid)
    return meta + struct.pack("=BBHIQQ", 6, 0, 24, 0, offset, count)


def test_parse_two_pre_access_events() -> None:
    """Two events in one read: fd, pid and range of each."""
    got = uapi.parse(event(5, 4096, 8192) + event(6, 0, 131072, pid=9))
    assert got == [uapi.Event(0x100000, 5, 77, 4096, 8192, True),
                   uapi.Event(0x100000, 6, 9, 0, 131072, True)]


def test_event_without_range_and_unknown_info() -> None:
    """An event with no info record has range False; unknown info types are skipped."""
    bare = struct.pack("=IBBHQii", 24, 3, 0, 24, 0x10, 7, 1)
    other = struct.pack("=BBH", 99, 0, 8) + b"\0" * 4
    with_other = struct.pack("=IBBHQii", 32, 3, 0, 24, 0x100000, 8, 1) + other
    got = uapi.parse(bare + with_other)
    assert [(e.fd, e.range) for e in got] == [(7, False), (8, False)]


@pytest.mark.parametrize(("buf", "what"), [
    (event(5, 0, 4096)[:20], "truncated event metadata"),
    (event(5, 0, 4096, vers=2), "version 2"),
    (event(5, 0, 4096)[:40], "event_len 48"),
    (struct.pack("=IBBHQii", 28, 3, 0, 24, 0, 5, 1) + struct.pack("=BBH", 6, 0, 24),
     "past the event's end"),
    (struct.pack("=IBBHQii", 32, 3, 0, 24, 0, 5, 1) + struct.pack("=BBH", 6, 0, 8) + b"\0" * 4,
     "range record of 8 bytes"),
])
def test_malformed_records_are_refused(buf: bytes, what: str) -> None:
    """Truncated, other-version and inconsistent records raise, naming the part."""
    with pytest.raises(uapi.FanotifyProtocolError, match=what):
        uapi.parse(buf)


def test_responses() -> None:
    """Allow is FAN_ALLOW; deny carries the errno in the top byte; others are refused."""
    assert uapi.response(5) == struct.pack("=iI", 5, 1)
    assert uapi.response(5, errno.EIO) == struct.pack("=iI", 5, 2 | (5 << 24))
    assert uapi.parse_response(uapi.response(9, errno.EIO)) == (9, errno.EIO)
    with pytest.raises(ValueError, match="errno 13"):
        uapi.response(5, errno.EACCES)  # the kernel would refuse it and keep the reader waiting


@given(st.integers(0, 2**31 - 1), st.integers(0, 2**63), st.integers(0, 2**63))
def test_round_trip(fd: int, offset: int, count: int) -> None:
    """Any fd and range survive parse."""
    (got,) = uapi.parse(event(fd, offset, count))
    assert (got.fd, got.offset, got.count) == (fd, offset, count)


def test_mountinfo_and_options() -> None:
    """mountinfo fields with escaped spaces; device= options in slot order, no commas."""
    text = ("36 35 0:30 / /mnt/a\\040b ro,relatime shared:1 - erofs /c/meta ro\n"
            "37 35 0:31 / /x rw - ext4 /dev/vda1 rw\n")
    assert layout.mounted(text) == {"/mnt/a b": ("erofs", "/c/meta"), "/x": ("ext4", "/dev/vda1")}
    assert layout.mount_options([]) == ""
    assert layout.mount_options([layout.Path("/a"), layout.Path("/b")]) == "device=/a,device=/b"
    with pytest.raises(ValueError, match="comma"):
        layout.mount_options([layout.Path("/a,b")])
    with pytest.raises(ValueError, match="bad domain"):
        layout.check_domain("../etc")
