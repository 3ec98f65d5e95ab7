# SPDX-License-Identifier: Apache-2.0
"""watchdog.Liveness on a real Service and the fake kernel: ping only while requests move."""
from __future__ import annotations

import asyncio
import time

from ondemand_d import wire
from ondemand_d.watchdog import Liveness
from tests.service.test_service import _remote_blob


async def test_idle_daemon_is_alive(env):
    """Nothing queued, nothing in flight: alive at every check."""
    live = Liveness(env.service, stall_after=30)
    assert live.check() and live.check()


async def test_reader_that_stopped_taking_requests_is_wedged(env):
    """The kernel has a request queued that the reader does not take: not alive."""
    live = Liveness(env.service, stall_after=30)
    assert live.check()
    env.service._pause()  # the reader is gone while the loop runs on  # noqa: SLF001
    env.kernel.send_raw(wire.build(wire.CloseRequest(99, 99)))
    await asyncio.sleep(0.05)
    assert live.queued()
    assert not live.check()
    assert live.wedged_since is not None
    env.service._resume()  # noqa: SLF001
    env.service._on_readable()  # noqa: SLF001
    assert live.check()  # it took the CLOSE: progress


async def test_read_stalled_past_the_threshold_stops_the_pings(env):
    """A READ waiting with no progress: alive until it is older than stall_after."""
    blob, _, remote = _remote_blob(env, 1 << 20)
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    live = Liveness(env.service, stall_after=0.2)
    outcome = env.kernel.send_read(obj, 0, 4096)
    await remote.started.wait()
    assert live.check()  # the READ was taken: progress
    assert live.check()  # waiting, but younger than 0.2 s
    time.sleep(0.25)
    assert not live.check()
    remote.release.set()
    await asyncio.wait_for(outcome.done.wait(), 5)
    await asyncio.sleep(0.05)
    assert live.check()
