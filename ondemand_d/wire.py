# SPDX-License-Identifier: Apache-2.0
"""The cachefiles on-demand wire format, as bytes in and values out. No I/O.

Mirrors include/uapi/linux/cachefiles.h, unchanged since Linux 5.19. Every
integer is in host byte order: the kernel copies native __u32/__u64 fields.
"""
from __future__ import annotations

import enum
import struct
import sys
from dataclasses import dataclass

from ondemand_d.errors import ProtocolError

#: CACHEFILES_MSG_MAX_SIZE: the read buffer every daemon uses.
CACHEFILES_MSG_MAX_SIZE = 1024
#: _IOW(0x98, 1, int) with the asm-generic encoding (x86, arm64, riscv).
CACHEFILES_IOC_READ_COMPLETE = 0x40049801

_E = "<" if sys.byteorder == "little" else ">"
# struct cachefiles_msg { __u32 msg_id, opcode, len, object_id; }  (16 bytes)
_HEADER = struct.Struct(_E + "IIII")
# struct cachefiles_open { __u32 volume_key_size, cookie_key_size, fd, flags; }
_OPEN = struct.Struct(_E + "IIII")
# struct cachefiles_read { __u64 off, len; }
_READ = struct.Struct(_E + "QQ")

HEADER_SIZE = _HEADER.size
OPEN_FIXED_SIZE = HEADER_SIZE + _OPEN.size
READ_SIZE = HEADER_SIZE + _READ.size


class Opcode(enum.IntEnum):
    """enum cachefiles_opcode."""

    OPEN = 0
    CLOSE = 1
    READ = 2


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """The kernel looked up a cookie; answer with `copen msg_id,size|-errno`.

    `fd` is an anon fd already installed in this process; it is ours to close.
    """

    msg_id: int
    object_id: int
    volume_key: bytes  # without the trailing NUL, e.g. b"erofs,domain"
    cookie_key: bytes  # e.g. the fsid or a device tag
    fd: int
    flags: int

    op = Opcode.OPEN


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Fill [off, off+len) of the object's cache file, then complete msg_id."""

    msg_id: int
    object_id: int
    off: int
    len: int

    op = Opcode.READ


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """The kernel dropped the object: close its anon fds. No reply."""

    msg_id: int
    object_id: int

    op = Opcode.CLOSE


Request = OpenRequest | ReadRequest | CloseRequest


def parse(buf: bytes | bytearray | memoryview) -> Request:
    """Parse exactly one message as returned by one read() of the device.

    Raises:
        ProtocolError: the bytes are not one well-formed message; `msg_id` is
            set when the header was readable, so the caller can still answer.
    """
    n = len(buf)
    if n < HEADER_SIZE:
        msg = f"message of {n} bytes is shorter than the {HEADER_SIZE}-byte header"
        raise ProtocolError(msg)
    if n > CACHEFILES_MSG_MAX_SIZE:
        msg = f"message of {n} bytes exceeds CACHEFILES_MSG_MAX_SIZE"
        raise ProtocolError(msg)
    msg_id, opcode, length, object_id = _HEADER.unpack_from(buf, 0)
    if length != n:
        msg = f"header says {length} bytes but read() returned {n}"
        raise ProtocolError(msg, msg_id, opcode=opcode, fd=_open_fd(buf, opcode))
    if opcode == Opcode.READ:
        if n != READ_SIZE:
            msg = f"READ of {n} bytes, expected {READ_SIZE}"
            raise ProtocolError(msg, msg_id, opcode=opcode)
        off, rlen = _READ.unpack_from(buf, HEADER_SIZE)
        return ReadRequest(msg_id, object_id, off, rlen)
    if opcode == Opcode.OPEN:
        return _parse_open(buf, msg_id, object_id)
    if opcode == Opcode.CLOSE:
        if n != HEADER_SIZE:
            msg = f"CLOSE of {n} bytes, expected {HEADER_SIZE}"
            raise ProtocolError(msg, msg_id, opcode=opcode)
        return CloseRequest(msg_id, object_id)
    msg = f"unknown opcode {opcode}"
    raise ProtocolError(msg, msg_id, opcode=opcode)


def _open_fd(buf: bytes | bytearray | memoryview, opcode: int) -> int | None:
    """An OPEN's fd field, if the message is long enough to hold it."""
    if opcode != Opcode.OPEN or len(buf) < OPEN_FIXED_SIZE:
        return None
    return int(_OPEN.unpack_from(buf, HEADER_SIZE)[2])


def _parse_open(buf: bytes | bytearray | memoryview, msg_id: int, object_id: int) -> OpenRequest:
    n = len(buf)
    if n < OPEN_FIXED_SIZE:
        msg = f"OPEN of {n} bytes is shorter than its {OPEN_FIXED_SIZE}-byte fixed part"
        raise ProtocolError(msg, msg_id, opcode=Opcode.OPEN)
    vsize, csize, fd, flags = _OPEN.unpack_from(buf, HEADER_SIZE)
    if OPEN_FIXED_SIZE + vsize + csize != n:
        msg = f"OPEN key sizes {vsize}+{csize} do not fill the {n}-byte message"
        raise ProtocolError(msg, msg_id, opcode=Opcode.OPEN, fd=fd)
    if vsize == 0 or buf[OPEN_FIXED_SIZE + vsize - 1] != 0:
        msg = "OPEN volume key does not end in NUL"
        raise ProtocolError(msg, msg_id, opcode=Opcode.OPEN, fd=fd)
    volume = bytes(buf[OPEN_FIXED_SIZE : OPEN_FIXED_SIZE + vsize - 1])
    cookie = bytes(buf[OPEN_FIXED_SIZE + vsize : n])
    return OpenRequest(msg_id, object_id, volume, cookie, fd, flags)


def build(req: Request) -> bytes:
    """Encode a request as the kernel would. For fakes and tests."""
    if isinstance(req, ReadRequest):
        return _HEADER.pack(req.msg_id, Opcode.READ, READ_SIZE, req.object_id) + _READ.pack(
            req.off, req.len
        )
    if isinstance(req, CloseRequest):
        return _HEADER.pack(req.msg_id, Opcode.CLOSE, HEADER_SIZE, req.object_id)
    volume = req.volume_key + b"\0"
    length = OPEN_FIXED_SIZE + len(volume) + len(req.cookie_key)
    return (
        _HEADER.pack(req.msg_id, Opcode.OPEN, length, req.object_id)
        + _OPEN.pack(len(volume), len(req.cookie_key), req.fd, req.flags)
        + volume
        + req.cookie_key
    )


def format_copen(msg_id: int, size_or_errno: int) -> bytes:
    """`copen <msg_id>,<size>`: decimal, no padding (a leading 0 means octal to the kernel).

    A negative value is a failed lookup and must be a valid -errno.
    """
    if msg_id < 0 or not -4095 <= size_or_errno < (1 << 63):  # noqa: PLR2004 - MAX_ERRNO
        msg = f"copen {msg_id},{size_or_errno} is out of range"
        raise ValueError(msg)
    return f"copen {msg_id},{size_or_errno}".encode()


def format_restore() -> bytes:
    """`restore`: re-mark requests a dead daemon had read as new (Linux 6.8+)."""
    return b"restore"


def split_volume_key(volume_key: bytes) -> bytes:
    """The domain or fsid from an EROFS volume key `erofs,<domain_id|fsid>`."""
    prefix = b"erofs,"
    return volume_key[len(prefix) :] if volume_key.startswith(prefix) else volume_key
