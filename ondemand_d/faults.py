# SPDX-License-Identifier: Apache-2.0
"""Faults a test can inject into a running daemon through its environment (a systemd drop-in).

Only for tests of what supervises the daemon (the watchdog, restarts); off unless set:

``ONDEMAND_D_TEST_WEDGE=SECONDS``
    that many seconds after `ready`, the request loop stops taking requests from the device
    for good, while the event loop, the control socket and the status reports run on: the
    daemon is wedged, not dead, and only the watchdog can tell.

``ONDEMAND_D_TEST_HOLD_READS=PATH``
    while the file PATH exists, READs are taken from the device and their data written, but
    never completed: the I/O thread that would complete one waits forever (logged as
    `test_fault_holding` with the msg_id). A daemon killed then leaves READs the kernel must
    send again after `restore`. (A file, so a test can mount first and hold later.)

``ONDEMAND_D_TEST_HOLD_BACKGROUND=PATH``
    while the file PATH exists, the first background write (prefill, prefetch, readahead)
    writes the first half of its range (whole blocks) and then blocks in its I/O thread for
    good, and so does every later one, before writing anything (each logged as
    `test_fault_holding_background` with the fd, offset and the bytes it `wrote`): a daemon
    killed then dies in the middle of a prefill, whatever the image's layout.
"""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import structlog

log = structlog.get_logger()

WEDGE = "ONDEMAND_D_TEST_WEDGE"
HOLD = "ONDEMAND_D_TEST_HOLD_READS"
HOLD_BACKGROUND = "ONDEMAND_D_TEST_HOLD_BACKGROUND"
BLOCK = 4096


def wrap_backend(backend: Any) -> Any:
    """The fill backend, or one that holds READs or background writes (the HOLD faults)."""
    flag, background = os.environ.get(HOLD), os.environ.get(HOLD_BACKGROUND)
    return _Holding(backend, flag, background) if flag or background else backend


class _Holding:
    def __init__(self, inner: Any, flag: str | None, background: str | None) -> None:
        self.inner = inner
        self.name = inner.name
        self.flag = flag
        self.background = background
        self._background_held = False
        self._lock = threading.Lock()
        self._never = threading.Event()

    def _hold(self, msg_id: int) -> bool:
        if not self.flag or not os.path.exists(self.flag):
            return False
        log.warning("test_fault_holding", fault=HOLD, msg_id=msg_id)
        self._never.wait()
        return True

    def __getattr__(self, name: str) -> Any:  # anything else the backend has (its pool)
        return getattr(self.inner, name)

    def _then(self, fd: int, msg_id: int, complete: bool) -> None:
        if complete and not self._hold(msg_id):
            self.inner.complete(fd, msg_id)

    def complete(self, fd: int, msg_id: int) -> None:
        self._then(fd, msg_id, True)

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        self.inner.fill(fd, buf, off, msg_id, complete=False)
        self._then(fd, msg_id, complete)

    def _hold_background(self, fd: int, parts: Any, off: int) -> None:
        with self._lock:
            first, self._background_held = not self._background_held, True
        wrote = 0
        if first:
            half = sum(len(p) for p in parts) // 2 // BLOCK * BLOCK
            prefix = _prefix(parts, half)
            if prefix:
                wrote = int(self.inner.fill_parts(fd, prefix, off, 0, complete=False))
        log.warning("test_fault_holding_background", fault=HOLD_BACKGROUND, fd=fd, off=off,
                    wrote=wrote)
        self._never.wait()

    def fill_parts(self, fd: int, parts: Any, off: int, msg_id: int, *, complete: bool,
                   size: int = 0) -> int:
        # Background writes carry msg_id 0.
        if msg_id == 0 and self.background and os.path.exists(self.background):
            self._hold_background(fd, parts, off)
        n = int(self.inner.fill_parts(fd, parts, off, msg_id, complete=False, size=size))
        self._then(fd, msg_id, complete)
        return n

    def fill_aligned(self, fd: int, buf: Any, length: int, off: int, msg_id: int, *,
                     complete: bool) -> int:
        n = int(self.inner.fill_aligned(fd, buf, length, off, msg_id, complete=False))
        self._then(fd, msg_id, complete)
        return n


def _prefix(parts: Any, length: int) -> list[memoryview]:
    """The first `length` bytes of a list of buffers, as views."""
    out = []
    for part in parts:
        if length <= 0:
            break
        view = memoryview(part)[:length]
        out.append(view)
        length -= len(view)
    return out


def arm(service: Any) -> None:
    """Schedule the faults the environment asks for (none in normal operation)."""
    after = os.environ.get(WEDGE)
    if not after:
        return
    asyncio.get_running_loop().call_later(float(after), _wedge, service)


def _wedge(service: Any) -> None:
    log.warning("test_fault_wedged", fault=WEDGE, note="the request loop stops reading")
    service._pause()  # the fault is exactly this
    service._resume = lambda: None  # and it never resumes
