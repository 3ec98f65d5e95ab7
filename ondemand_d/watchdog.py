# SPDX-License-Identifier: Apache-2.0
"""Is the request loop alive? The answer decides whether systemd gets `WATCHDOG=1`.

A running event loop is not enough: a daemon whose reader stopped taking requests,
or whose READs never finish, must be restarted (the successor gets the pending
requests again through `restore`). The loop is alive when, since the last check,

* it took a request from the device or finished a READ (progress), or
* it is waiting, not stuck: no READ is older than `stall_after`, and if the kernel has
  requests queued, READs in flight explain why the reader has not taken them (all
  slots busy).
"""
from __future__ import annotations

import select
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger()


@dataclass
class Liveness:
    """Checks one service's request loop; call `check()` once per watchdog period."""

    service: Any  # ondemand_d.service.Service
    stall_after: float  # seconds a READ may wait before the loop counts as stuck
    _last: tuple[int, int] = (-1, -1)
    _poll: Any = field(default=None, repr=False)
    wedged_since: float | None = None

    def progress(self) -> tuple[int, int]:
        """(requests taken from the device, READs finished): both only grow."""
        c = self.service.counters
        taken = c.opens + c.reads + c.closes + c.malformed
        return taken, c.reads - self.service.objects.reads_in_flight

    def queued(self) -> bool:
        """Whether the kernel has a request for us that we have not read."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.service.device.fd, select.POLLIN)
        return any(ev & select.POLLIN for _, ev in self._poll.poll(0))

    def oldest_read_age(self) -> float:
        reads = getattr(self.service, "reads", {})
        now = time.perf_counter()
        return max((now - r.start for r in list(reads.values())), default=0.0)

    def check(self) -> bool:
        now = self.progress()
        moved = now != self._last
        self._last = now
        busy = self.service.objects.reads_in_flight > 0
        alive = moved or (self.oldest_read_age() < self.stall_after
                          and (busy or not self.queued()))
        if alive:
            if self.wedged_since is not None:
                log.info("request_loop_resumed")
            self.wedged_since = None
        elif self.wedged_since is None:
            self.wedged_since = time.monotonic()
            log.error("request_loop_stalled", reads_in_flight=self.service.objects
                      .reads_in_flight, oldest_read_s=round(self.oldest_read_age(), 1),
                      queued=self.queued(), hint="watchdog pings stop; systemd restarts us")
        return alive
