# SPDX-License-Identifier: Apache-2.0
"""Durable file writes for the store: write, fsync, rename, fsync the directory.

Every store mutation goes through the few functions here, so a crash test can
inject a fault at each step: set ``ONDEMAND_D_FAULT=STEP:N:KIND`` (STEP one of
``write``, ``fsync``, ``rename``, ``unlink``; N counting that step's calls from 1 in
this process; KIND ``ENOSPC``, ``EIO`` or ``KILL`` for a SIGKILL of the process).
Without the variable the hook costs one attribute test per call.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
from pathlib import Path

_FAULT_ENV = "ONDEMAND_D_FAULT"


class _Faults:
    """The injection plan from the environment, and per-step counters."""

    def __init__(self) -> None:
        self.arm(os.environ.get(_FAULT_ENV, ""))

    def arm(self, spec: str) -> None:
        """Plan one fault ("STEP:N:KIND"), or none (""); counting starts again."""
        self.step, self.at, self.kind = "", 0, ""
        self.counts: dict[str, int] = {}
        if spec:
            step, at, kind = spec.split(":")
            self.step, self.at, self.kind = step, int(at), kind.upper()

    def count_only(self) -> None:
        """Count every step without failing any (to learn how many a command takes)."""
        self.arm("none:0:EIO")

    def hit(self, step: str, path: object) -> None:
        if not self.step:
            return
        n = self.counts[step] = self.counts.get(step, 0) + 1
        if step != self.step or n != self.at:
            return
        if self.kind == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        code = errno.ENOSPC if self.kind == "ENOSPC" else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (injected at {step} #{n})", str(path))


faults = _Faults()


@functools.cache
def _libc_syncfs() -> object:
    """libc's syncfs, looked up on first use: ctypes costs start-up every serve would pay."""
    import ctypes  # noqa: PLC0415

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's among them
    except OSError:
        return None
    return getattr(libc, "syncfs", None)


def syncfs(anchor: Path) -> None:
    """Flush the whole file system holding `anchor` (data and directory entries).

    One syncfs(2) after writing many chunk files costs far less than an fsync each.
    """
    faults.hit("fsync", anchor)
    fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        call = _libc_syncfs()
        if call is None or call(fd) != 0:  # type: ignore[operator]
            os.sync()
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename or unlink in it) durable."""
    faults.hit("fsync", path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(tmp: Path, data: bytes | memoryview, mode: int, *, sync: bool) -> None:
    """Write `data` to a fresh file `tmp`, fsync'd when `sync`; removed again on failure."""
    try:
        faults.hit("write", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                faults.hit("fsync", tmp)
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def rename(src: Path, dst: Path) -> None:
    """Atomically replace `dst` with `src` (the caller fsyncs the directory)."""
    try:
        faults.hit("rename", dst)
        os.replace(src, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            src.unlink()
        raise


def link_new(src: Path, dst: Path) -> bool:
    """Give `src` the name `dst` unless `dst` exists; False if it did (never replaced)."""
    faults.hit("rename", dst)
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    return True


def unlink(path: Path) -> bool:
    """Remove `path`; False if it was already gone."""
    faults.hit("unlink", path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
