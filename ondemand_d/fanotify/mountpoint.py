# SPDX-License-Identifier: Apache-2.0
"""The directory a mount goes on: opened without following a symlink, checked, named.

A mount is made on the O_PATH fd opened here, never on a path looked up again: what
was checked is what gets mounted on.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ondemand_d.errors import MountError
from ondemand_d.fanotify import layout, syscalls


def open_mountpoint(path: str, keep_dirs: tuple[Path, ...]) -> tuple[int, str]:
    """The checked O_PATH fd of the directory `path`, and its canonical path.

    Raises:
        MountError: not absolute, a symlink on the way, no directory, or a directory
            that `layout.refuse_mountpoint` refuses (the daemon's own, a system one).
    """
    if not os.path.isabs(path):
        msg = f"{path} is not an absolute path"
        raise MountError(msg)
    try:
        fd = syscalls.open_dir_nofollow(path)
    except OSError as exc:
        reason = {errno.ELOOP: "it has a symlink in its path: give the real directory",
                  errno.ENOTDIR: "not a directory: create it first",
                  errno.ENOENT: "not a directory: create it first (no such directory)",
                  errno.EXDEV: "it crosses a magic link"}.get(
                      exc.errno or 0, exc.strerror or str(exc))
        raise MountError(f"{path}: {reason}") from None
    try:
        target = syscalls.fd_path(fd)
        refusal = layout.refuse_mountpoint(target, keep_dirs)
        if refusal is not None:
            raise MountError(refusal)
    except BaseException:
        os.close(fd)
        raise
    return fd, target


def mount_table_name(path: str) -> str:
    """The mount table's name for `path` (umount: a lookup, the mount itself is by fd)."""
    target = os.path.realpath(path)
    if not os.path.isdir(target):
        msg = f"{path} is not a directory: create it first"
        raise MountError(msg)
    return target


def is_mount_root(fd: int) -> bool:
    """Whether the directory open as `fd` is the root of a mount (asked of the fd)."""
    st, parent = os.fstat(fd), os.stat("..", dir_fd=fd)
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def current_options(mountpoint: str) -> str:
    """The mount's flags as the kernel has them ("ro,nosuid,nodev,relatime"), or ""."""
    try:
        return layout.current_flags(mountpoint)
    except OSError:
        return ""
