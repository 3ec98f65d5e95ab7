# SPDX-License-Identifier: Apache-2.0
"""The start-up probe: do fanotify pre-content events work here, and if not, why."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ondemand_d.fanotify import layout, syscalls


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether pre-content events work here, and if not, the sentence saying why."""

    available: bool
    reason: str = ""


def probe(cache_dir: Path, group: int | None = None) -> Probe:
    """Try a FAN_PRE_ACCESS mark on a file in the front end's directory of `cache_dir`."""
    own = group is None
    try:
        if group is None:
            group = syscalls.fanotify_init()
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return Probe(False, "fanotify pre-content groups need CAP_SYS_ADMIN: run as root")
        return Probe(False, f"this kernel has no fanotify pre-content class ({exc.strerror}): "
                     "it needs CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y")
    try:
        where = layout.root(cache_dir)
        try:
            where.mkdir(parents=True, exist_ok=True)
            fd = os.open(where / ".probe", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return Probe(False, f"cannot create {where}: {exc.strerror}")
        try:
            syscalls.mark_fd(group, fd)
            syscalls.mark_fd(group, fd, remove=True)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return Probe(False, f"kernel {os.uname().release} has no fanotify pre-content "
                             "events (FAN_PRE_ACCESS needs Linux 6.14+)")
            if exc.errno == errno.EOPNOTSUPP:
                return Probe(False, f"the filesystem of {where} refuses pre-content marks "
                             "(tmpfs does): put cache_dir on ext4, xfs or btrfs")
            return Probe(False, f"a pre-content mark on {where} failed: {exc.strerror}")
        finally:
            os.close(fd)
        return Probe(True)
    finally:
        if own:
            os.close(group)
