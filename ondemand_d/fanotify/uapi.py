# SPDX-License-Identifier: Apache-2.0
"""fanotify's records for pre-content events: parse what read() returns, format answers.

No I/O here. Layouts follow include/uapi/linux/fanotify.h (Linux 6.14+); Debian 12's
copy lacks the pre-content parts, so the values are written out below.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# fanotify_init flags and event_f_flags
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_PRE_CONTENT = 0x00000008
FAN_UNLIMITED_QUEUE = 0x00000010
# fanotify_mark flags and masks
FAN_MARK_ADD = 0x00000001
FAN_MARK_REMOVE = 0x00000002
FAN_PRE_ACCESS = 0x00100000  # 6.14
FAN_Q_OVERFLOW = 0x00004000
# responses
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_ERRNO_SHIFT = 24
FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_RANGE = 6
#: The errnos a FAN_DENY_ERRNO answer may carry; any other makes write() fail with EINVAL
#: and leaves the reader waiting (fs/notify/fanotify/fanotify_user.c, 6.14).
DENY_ERRNOS = frozenset({1, 5, 11, 16, 26, 28, 122})  # EPERM EIO EAGAIN EBUSY ETXTBSY ENOSPC EDQUOT

# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_METADATA = struct.Struct("=IBBHQii")  # 24 bytes
# struct fanotify_event_info_header: info_type, pad, len
_INFO_HEADER = struct.Struct("=BBH")  # 4 bytes
# struct fanotify_event_info_range: header, u32 pad, u64 offset, u64 count
_RANGE = struct.Struct("=BBHIQQ")  # 24 bytes
# struct fanotify_response: s32 fd, u32 response
_RESPONSE = struct.Struct("=iI")  # 8 bytes
RESPONSE_SIZE = _RESPONSE.size


class FanotifyProtocolError(ValueError):
    """The kernel sent a record this code cannot read (the message says which part)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `fd` is a new fd on the file, `mask` the event bits.

    For a FAN_PRE_ACCESS event `offset`/`count` is the range about to be read
    (page-aligned; `count` may run past the end of the file). `range` is False
    for events without a range record (other event types, or an overflow).
    """

    mask: int
    fd: int
    pid: int
    offset: int = 0
    count: int = 0
    range: bool = False

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)


def parse(buf: bytes | memoryview) -> list[Event]:
    """The events in one read() of the group fd.

    Raises:
        FanotifyProtocolError: a record is truncated, of another version, or its lengths
            do not add up. Events parsed before it are lost with it: the caller must
            answer nothing it cannot name, and log the raw bytes.
    """
    view = memoryview(buf)
    out: list[Event] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < _METADATA.size:
            msg = f"truncated event metadata: {len(view) - pos} bytes at {pos}"
            raise FanotifyProtocolError(msg)
        event_len, vers, _, meta_len, mask, fd, pid = _METADATA.unpack_from(view, pos)
        if vers != FANOTIFY_METADATA_VERSION:
            msg = f"event metadata version {vers} (this code reads {FANOTIFY_METADATA_VERSION})"
            raise FanotifyProtocolError(msg)
        if meta_len < _METADATA.size or event_len < meta_len or pos + event_len > len(view):
            msg = f"event at {pos}: event_len {event_len}, metadata_len {meta_len}"
            raise FanotifyProtocolError(msg)
        offset = count = 0
        has_range = False
        info = pos + meta_len
        end = pos + event_len
        while info < end:
            if end - info < _INFO_HEADER.size:
                msg = f"truncated info record at {info}"
                raise FanotifyProtocolError(msg)
            info_type, _, info_len = _INFO_HEADER.unpack_from(view, info)
            if info_len < _INFO_HEADER.size or info + info_len > end:
                msg = f"info record at {info}: len {info_len} past the event's end"
                raise FanotifyProtocolError(msg)
            if info_type == FAN_EVENT_INFO_TYPE_RANGE:
                if info_len < _RANGE.size:
                    msg = f"range record of {info_len} bytes (expected {_RANGE.size})"
                    raise FanotifyProtocolError(msg)
                _, _, _, _, offset, count = _RANGE.unpack_from(view, info)
                has_range = True
            info += info_len
        out.append(Event(mask, fd, pid, offset, count, has_range))
        pos += event_len
    return out


def response(fd: int, error: int = 0) -> bytes:
    """The answer to event `fd`: allow it (error 0), or deny it with errno `error`.

    Raises:
        ValueError: `error` is not one the kernel passes on (see DENY_ERRNOS).
    """
    if error == 0:
        return _RESPONSE.pack(fd, FAN_ALLOW)
    if error not in DENY_ERRNOS:
        msg = f"errno {error} cannot be returned through FAN_DENY_ERRNO"
        raise ValueError(msg)
    return _RESPONSE.pack(fd, FAN_DENY | (error << FAN_ERRNO_SHIFT))


def parse_response(buf: bytes) -> tuple[int, int]:
    """(fd, errno) of a response made by `response` (0 for allow); for tests and tracing."""
    fd, answer = _RESPONSE.unpack(buf)
    if answer == FAN_ALLOW:
        return fd, 0
    return fd, (answer >> FAN_ERRNO_SHIFT) & 0xFF
