# SPDX-License-Identifier: Apache-2.0
"""PriorityLimiter and TokenBucket: demand first, prefetch capped, cancellation safe."""

from __future__ import annotations

import asyncio
import time

from ondemand_d.registry._limiter import Priority, PriorityLimiter, TokenBucket


async def test_demand_overtakes_queued_prefetch() -> None:
    """With the one slot busy, a later demand waiter gets it before earlier prefetch waiters."""
    lim = PriorityLimiter(1, 1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold() -> None:
        async with lim.slot("demand"):
            await release.wait()

    async def want(name: str, priority: Priority) -> None:
        async with lim.slot(priority):
            order.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    tasks = [
        asyncio.create_task(want("p1", "prefetch")),
        asyncio.create_task(want("p2", "prefetch")),
    ]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(want("d1", "demand")))
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, *tasks), 5)
    assert order == ["d1", "p1", "p2"]
    assert lim.busy == 0


async def test_prefetch_never_takes_every_slot() -> None:
    """Prefetch holders stop at prefetch_capacity, so a demand request starts at once."""
    lim = PriorityLimiter(3, 2)
    started = 0
    gate = asyncio.Event()

    async def prefetch() -> None:
        nonlocal started
        async with lim.slot("prefetch"):
            started += 1
            await gate.wait()

    tasks = [asyncio.create_task(prefetch()) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert started == 2
    async with asyncio.timeout(1):
        async with lim.slot("demand"):
            assert lim.busy == 3
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert started == 5 and lim.busy == 0


async def test_cancelled_waiter_leaves_no_trace() -> None:
    """A waiter cancelled while queued neither leaks a slot nor blocks the next one."""
    lim = PriorityLimiter(1, 1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with lim.slot():
            await gate.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await asyncio.wait_for(holder, 5)
    async with asyncio.timeout(1), lim.slot():
        pass
    assert lim.busy == 0


async def test_token_bucket_caps_rate() -> None:
    """Taking 3x the rate (after a 1x burst) takes about 2 seconds; rate 0 is free."""
    bucket = TokenBucket(100_000, burst=100_000)
    start = time.monotonic()
    for _ in range(3):
        await bucket.take(100_000)
    assert 1.8 <= time.monotonic() - start < 4
    free = TokenBucket(0)
    start = time.monotonic()
    await free.take(10**12)
    assert time.monotonic() - start < 0.1
