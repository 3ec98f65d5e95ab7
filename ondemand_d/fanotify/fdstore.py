# SPDX-License-Identifier: Apache-2.0
"""Where the group fd and the fill fds outlive a crash: the protocol, systemd's store, the names.

A closed group allows every pending event (readers would get zeros), and a fill fd
opened again while the mark is on its file would raise events on the daemon's own
writes: so both are kept where a successor finds them, under the names below.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from ondemand_d import systemd

FDSTORE_GROUP = "fanotify"
FDSTORE_FILE_PREFIX = "fanotify-file."


class FdStore(Protocol):
    """Where the group and the fill fds are kept across a crash (systemd, or the holder)."""

    def store(self, fd: int, name: str) -> bool: ...

    def remove(self, name: str) -> None: ...

    def close(self, *, clean: bool) -> None: ...


class SystemdFdStore:
    """systemd's fd store (a no-op off systemd); systemd itself drops it at a clean stop."""

    def store(self, fd: int, name: str) -> bool:
        return systemd.store_fd(fd, name)

    def remove(self, name: str) -> None:
        systemd.remove_fd(name)

    def close(self, *, clean: bool) -> None:
        pass


def fdstore_name(path: Path) -> str:
    """The fd store name of a blob file's fill fd (FDNAME allows 255 characters)."""
    return FDSTORE_FILE_PREFIX + hashlib.sha256(str(path).encode()).hexdigest()[:32]
