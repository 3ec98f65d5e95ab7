# SPDX-License-Identifier: Apache-2.0
"""fanotify_init, fanotify_mark, the new mount API and umount2, called through libc.

Why ctypes and not the cffi shim: these run a few times per mount (set-up, never per
event; events are plain read()/write() on the group fd through `os`), so the call cost
does not matter. glibc 2.36 wraps fsopen/fsconfig/fsmount/move_mount but not openat2,
so all five go through syscall(2) with their numbers (the same on x86_64 and aarch64:
both use the generic table for syscalls added after 5.0). Failures raise OSError with
the errno, like `os`.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Sequence

from ondemand_d.fanotify import uapi

AT_FDCWD = -100
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
# include/uapi/linux/mount.h (5.2+)
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
# include/uapi/linux/openat2.h (5.6+)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
O_PATH = 0o10000000
#: asm-generic/unistd.h numbers; x86_64 took the same ones for these calls.
_NR = {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "openat2": 437}
_ARCHES = ("x86_64", "aarch64")

# The libc this process already has (no ctypes.util.find_library: it runs ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),  # noqa: RUF012
                ("resolve", ctypes.c_uint64)]


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _syscall(name: str, *args: object) -> int:
    if platform.machine() not in _ARCHES:
        raise OSError(38, f"{name}: not wired for {platform.machine()} (only {_ARCHES})")
    return int(_libc.syscall(ctypes.c_long(_NR[name]), *args))


def fanotify_init() -> int:
    """A new pre-content group: close-on-exec, non-blocking, unlimited queue; event fds O_RDWR."""
    flags = (uapi.FAN_CLASS_PRE_CONTENT | uapi.FAN_CLOEXEC | uapi.FAN_NONBLOCK
             | uapi.FAN_UNLIMITED_QUEUE)
    return _check(_libc.fanotify_init(flags, os.O_RDWR | os.O_LARGEFILE), "fanotify_init")


def mark_fd(group: int, fd: int, *, remove: bool = False) -> None:
    """Add (or remove) a FAN_PRE_ACCESS inode mark on the file open as `fd`."""
    flags = uapi.FAN_MARK_REMOVE if remove else uapi.FAN_MARK_ADD
    _check(_libc.fanotify_mark(group, flags, uapi.FAN_PRE_ACCESS, fd, None), "fanotify_mark")


def mark_path(group: int, path: str) -> None:
    """Add a FAN_PRE_ACCESS inode mark on `path` without opening it (the fail-closed deny)."""
    _check(_libc.fanotify_mark(group, uapi.FAN_MARK_ADD, uapi.FAN_PRE_ACCESS, AT_FDCWD,
                               path.encode()), "fanotify_mark", path)


def open_dir_nofollow(path: str) -> int:
    """An O_PATH fd of the directory `path`, resolved once with no symlink on the way.

    The mount is made on this fd (move_mount), so what was checked is what is mounted on:
    a symlink swapped in after the check cannot redirect it.
    """
    how = _OpenHow(os.O_DIRECTORY | O_PATH | os.O_CLOEXEC, 0,
                   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _check(_syscall("openat2", ctypes.c_int(AT_FDCWD), ctypes.c_char_p(path.encode()),
                         ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))), "openat2", path)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):  # O_DIRECTORY says so already; belt and braces
        os.close(fd)
        raise OSError(20, "not a directory", path)
    return fd


def fd_path(fd: int) -> str:
    """The path the kernel has for `fd` (not re-resolved: it is read from the fd)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def mount_erofs(source: str, target_fd: int, devices: list[str], *, nosuid: bool = True,
                options: Sequence[tuple[str, str | None]] = ()) -> None:
    """Mount a file-backed EROFS read-only on the directory open as `target_fd`.

    `options` are extra superblock parameters: (name, None) for a flag
    ("inode_share"), (name, value) for a string ("domain_id", "DOM").

    New mount API, never util-linux (it would use a loop device, which raises no events):
    the superblock takes `source` and one `device` per data blob; the mount gets
    MOUNT_ATTR_RDONLY and, unless `nosuid` is False, NOSUID and NODEV (a setuid file or a
    device node in an image then confers nothing); move_mount puts it on the target fd.
    """
    fs = _check(_syscall("fsopen", ctypes.c_char_p(b"erofs"), ctypes.c_uint(FSOPEN_CLOEXEC)),
                "fsopen erofs")
    try:
        def config(cmd: int, key: bytes | None, value: bytes | None) -> None:
            _check(_syscall("fsconfig", ctypes.c_int(fs), ctypes.c_uint(cmd),
                            ctypes.c_char_p(key), ctypes.c_char_p(value), ctypes.c_int(0)),
                   f"fsconfig {(key or b'create').decode()}", source)

        config(FSCONFIG_SET_STRING, b"source", source.encode())
        for device in devices:
            config(FSCONFIG_SET_STRING, b"device", device.encode())
        for name, value in options:
            config(FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING, name.encode(),
                   None if value is None else value.encode())
        config(FSCONFIG_CMD_CREATE, None, None)
        attrs = MOUNT_ATTR_RDONLY | (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV if nosuid else 0)
        mnt = _check(_syscall("fsmount", ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC),
                              ctypes.c_uint(attrs)), "fsmount", source)
    finally:
        os.close(fs)
    try:
        _check(_syscall("move_mount", ctypes.c_int(mnt), ctypes.c_char_p(b""),
                        ctypes.c_int(target_fd), ctypes.c_char_p(b""),
                        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)),
               "move_mount", fd_path(target_fd))
    finally:
        os.close(mnt)


def umount(target: str, *, detach: bool = False) -> None:
    """umount2 without following a symlink in the last component."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def erofs_takes(key: str, value: str | None = None) -> bool | None:
    """Does this kernel's EROFS accept the mount parameter `key` (a string, or a flag when
    `value` is None)? Asked of an fsopen context that is then dropped: nothing is mounted.

    None when it cannot be asked (no new mount API, or no CAP_SYS_ADMIN): the caller
    decides what not knowing means. EROFS itself missing is False.
    """
    try:
        fs = _check(_syscall("fsopen", ctypes.c_char_p(b"erofs"), ctypes.c_uint(FSOPEN_CLOEXEC)),
                    "fsopen erofs")
    except OSError as exc:
        return False if exc.errno == errno.ENODEV else None
    try:
        cmd = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
        _check(_syscall("fsconfig", ctypes.c_int(fs), ctypes.c_uint(cmd),
                        ctypes.c_char_p(key.encode()),
                        ctypes.c_char_p(None if value is None else value.encode()),
                        ctypes.c_int(0)), f"fsconfig {key}")
        # A parameter known but compiled out can be accepted with only an error message
        # in the context's log ("e erofs: fsid option not supported", 6.x without
        # EROFS_FS_ONDEMAND): read the log too.
        return not any(line.startswith(b"e ") for line in _context_log(fs))
    except OSError as exc:
        return False if exc.errno == errno.EINVAL else None  # EINVAL: unknown (7.2's fsid)
    finally:
        os.close(fs)


def _context_log(fs: int) -> list[bytes]:
    """The messages an fsopen context logged (read until ENODATA: one message a read)."""
    lines = []
    for _ in range(64):  # the kernel keeps at most 8; bounded all the same
        try:
            lines.append(os.read(fs, 4096))
        except OSError:  # ENODATA: no more
            break
    return lines
