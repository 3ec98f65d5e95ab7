# SPDX-License-Identifier: Apache-2.0
"""fanotify_init, fanotify_mark, mount and umount2, called through libc with ctypes.

Why ctypes and not the cffi shim: these run a few times per mount (set-up, never per
event; events are plain read()/write() on the group fd through `os`), so the call cost
does not matter, and glibc 2.36 has every one of them. The shim stays the small piece
of C the per-READ path needs. Failures raise OSError with the errno, like `os`.
"""
from __future__ import annotations

import ctypes
import os

from ondemand_d.fanotify import uapi

AT_FDCWD = -100
MS_RDONLY = 1
MNT_DETACH = 2

# The libc this process already has (no ctypes.util.find_library: it runs ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def fanotify_init() -> int:
    """A new pre-content group: close-on-exec, non-blocking, unlimited queue; event fds O_RDWR."""
    flags = (uapi.FAN_CLASS_PRE_CONTENT | uapi.FAN_CLOEXEC | uapi.FAN_NONBLOCK
             | uapi.FAN_UNLIMITED_QUEUE)
    return _check(_libc.fanotify_init(flags, os.O_RDWR | os.O_LARGEFILE), "fanotify_init")


def mark_fd(group: int, fd: int, *, remove: bool = False) -> None:
    """Add (or remove) a FAN_PRE_ACCESS inode mark on the file open as `fd`."""
    flags = uapi.FAN_MARK_REMOVE if remove else uapi.FAN_MARK_ADD
    _check(_libc.fanotify_mark(group, flags, uapi.FAN_PRE_ACCESS, fd, None), "fanotify_mark")


def mount_erofs(source: str, target: str, options: str) -> None:
    """mount(2) a file-backed EROFS read-only (never util-linux: it would use a loop device,
    which raises no events)."""
    _check(_libc.mount(source.encode(), target.encode(), b"erofs", MS_RDONLY, options.encode()),
           "mount", target)


def umount(target: str, *, detach: bool = False) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH if detach else 0), "umount", target)
