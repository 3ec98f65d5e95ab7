# SPDX-License-Identifier: Apache-2.0
"""Leases: the blobs a running daemon has open survive gc until they are closed.

A daemon keeps two files in ``leases/``: ``<id>.lock``, flock()ed for as long
as the process lives, and ``<id>.json``, the blob ids its open objects use.
gc treats a lease whose lock it cannot take as live and keeps its blobs; a
lease whose lock it can take belongs to a dead process and is removed.

The daemon resolves a cookie key and records the blob in its lease while
holding ``gc.lock`` shared; gc holds it exclusively from reading the leases
until the dead blob records are gone. So no blob can be resolved after gc
decided it was dead, and none can be resolved before and missed by gc.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger()
GC_LOCK = "gc.lock"


@contextlib.contextmanager
def gc_lock(root: Path, *, exclusive: bool) -> Iterator[None]:
    """Shared for a daemon resolving a key, exclusive for gc marking and removing records.

    A daemon serving a read-only store (no gc can run there) goes without.
    """
    try:
        fd = os.open(root / GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        if exclusive:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


class Lease:
    """One process's lease on the blobs it has open (files created on first use).

    It names the blobs of open objects (`keep`) and of OPENs being answered
    (`begin` ... `settle`), so a blob is covered from the moment it is resolved.
    """

    def __init__(self, root: Path) -> None:
        self._dir = root / "leases"
        self._name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()  # the loop thread and the I/O pool both update it
        self._pending: Counter[str] = Counter()
        self._live: frozenset[str] = frozenset()
        self._written: frozenset[str] = frozenset()
        self._warned = False

    def begin(self, blob_id: str) -> None:
        with self._mutex:
            self._pending[blob_id] += 1
            self._sync()

    def settle(self, blob_id: str | None, live: set[str]) -> None:
        with self._mutex:
            if blob_id is not None and self._pending[blob_id] > 0:
                self._pending[blob_id] -= 1
            self._pending += Counter()  # drop the zeros
            self._live = frozenset(live)
            self._sync()

    def keep(self, live: set[str]) -> None:
        with self._mutex:
            self._live = frozenset(live)
            self._sync()

    @property
    def held(self) -> frozenset[str]:
        return self._written

    def _sync(self) -> None:
        ids = self._live | frozenset(self._pending)
        if ids == self._written:
            return
        tmp = self._dir / f"{self._name}.tmp"
        # No fsync: after a crash the process is gone, and so is its lease.
        try:
            if self._lock_fd is None:
                fd = os.open(self._dir / f"{self._name}.lock",
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            tmp.write_text(json.dumps(sorted(ids)))
            os.replace(tmp, self._dir / f"{self._name}.json")
        except OSError as exc:  # serving goes on; only a concurrent gc could now take too much
            if not self._warned:  # once: a read-only store fails every time
                log.warning("lease_write_failed", error=str(exc), blobs=len(ids))
                self._warned = True
            return
        self._written = ids

    def close(self) -> None:
        with self._mutex:
            if self._lock_fd is None:
                return
            for suffix in (".json", ".tmp", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / f"{self._name}{suffix}").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
            self._written = frozenset()


def leased_blobs(root: Path, *, remove_stale: bool) -> set[str]:
    """Blob ids named by live leases; leases of dead processes are removed if asked."""
    held: set[str] = set()
    directory = root / "leases"
    for lock in sorted(directory.glob("*.lock")):
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    held.update(json.loads((directory / f"{lock.stem}.json").read_text()))
                continue
            if remove_stale:
                for suffix in (".json", ".tmp", ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        (directory / f"{lock.stem}{suffix}").unlink()
        finally:
            os.close(fd)
    return held
