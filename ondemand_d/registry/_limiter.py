# SPDX-License-Identifier: Apache-2.0
"""Per-registry request slots with demand-before-prefetch priority, and a byte-rate cap."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from typing import Literal

Priority = Literal["demand", "prefetch"]
_RANK = {"demand": 0, "prefetch": 1}


class PriorityLimiter:
    """At most `capacity` holders; a freed slot goes to the oldest demand waiter first.

    Prefetch holders are further capped at `prefetch_capacity`, so a burst of
    prefetch can never take every slot and a demand READ waits at most for one
    request to finish, not for a queue of them.
    """

    def __init__(self, capacity: int, prefetch_capacity: int) -> None:
        self._capacity = capacity
        self._prefetch_capacity = prefetch_capacity
        self._busy = 0
        self._busy_prefetch = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def busy(self) -> int:
        return self._busy

    def _can_start(self, rank: int) -> bool:
        if self._busy >= self._capacity:
            return False
        return rank == 0 or self._busy_prefetch < self._prefetch_capacity

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority = "demand") -> AsyncIterator[None]:
        rank = _RANK[priority]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (rank, next(self._seq), fut)
        heapq.heappush(self._waiters, entry)
        self._wake()  # queue first, then wake: one code path keeps the order honest
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release(rank)  # woken and cancelled in the same tick: pass it on
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise
        try:
            yield
        finally:
            self._release(rank)

    def _take(self, rank: int) -> None:
        self._busy += 1
        self._busy_prefetch += rank

    def _release(self, rank: int) -> None:
        self._busy -= 1
        self._busy_prefetch -= rank
        self._wake()

    def _wake(self) -> None:
        # Waiters are ordered (rank, arrival); a prefetch head blocked by its own
        # cap must not stop a demand waiter behind it, hence the scan.
        for entry in sorted(self._waiters):
            rank, _, fut = entry
            if fut.done():
                continue
            if not self._can_start(rank):
                if rank == 0:
                    return
                continue
            self._waiters.remove(entry)
            heapq.heapify(self._waiters)
            self._take(rank)
            fut.set_result(None)


class TokenBucket:
    """Caps a byte rate: take(n) sleeps until n bytes fit under `rate` bytes/s (0 = no cap)."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self._burst = burst if burst is not None else max(rate, 1)
        self._tokens = float(self._burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # one taker at a time keeps the order fair
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n  # may go negative: a large request pays back by waiting
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
