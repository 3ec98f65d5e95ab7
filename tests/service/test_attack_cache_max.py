# SPDX-License-Identifier: Apache-2.0
"""cache_max on the fscache front end (fake kernel): prefetch and readahead stop at it; a
READ past it has unused cache files culled first, and fails only if that is not enough."""
from __future__ import annotations

from ondemand_d import cachedir
from ondemand_d.fill import CacheLimit

from .test_service import PAGE, _events, _ingest, _until

GUARD = 10.0


async def test_attack_prefetch_stops_at_cache_max(make_env, tmp_path):
    """A 9 MiB data blob prefetched under a 4 MiB cache_max: the prefetch writes no more than
    the limit and says why."""
    env = await make_env(prefetch=True, cache_limit=CacheLimit(tmp_path / "cache", 4 << 20))
    env.kernel.layout = True  # cache files where cachefiles puts them: what cache_max counts
    blob, source = _ingest(env, (9 << 20) + 4321)
    obj = await env.kernel.open(b"data")
    await _until(lambda: _events(env, "prefilled"), GUARD)
    (done,) = _events(env, "prefilled")
    assert done["outcome"] == "ok"
    assert "stopped at cache_max" in done["note"] and str(4 << 20) in done["note"]
    held = cachedir.file_data_bytes(obj.path)
    assert 0 < held <= 4 << 20 and done["bytes"] == held, (held, done)
    assert not env.kernel.range_present(obj, 8 << 20, PAGE)  # left for READs: a hole
    assert env.kernel.cache_bytes(obj)[:PAGE] == source[:PAGE]


async def test_attack_readahead_stops_at_cache_max(make_env, tmp_path):
    env = await make_env(readahead=8 << 20, cache_limit=CacheLimit(tmp_path / "cache", 3 << 20))
    env.kernel.layout = True
    blob, source = _ingest(env, 12 << 20)
    obj = await env.kernel.open(b"data")
    assert await env.kernel.read(obj, 0, PAGE, timeout=GUARD)
    await _until(lambda: _events(env, "read_ahead"), GUARD)
    (ahead,) = _events(env, "read_ahead")
    assert "stopped at cache_max" in ahead["note"]
    assert cachedir.file_data_bytes(obj.path) <= 3 << 20
    assert env.kernel.cache_bytes(obj)[:PAGE] == source[:PAGE]


async def test_attack_read_past_cache_max_culls_unused_then_fails(make_env, tmp_path):
    """A READ that would pass cache_max first has the kernel cull the cache files no object
    holds; if that is not enough it fails (the reader gets EIO, never zeros) with a
    cache_full line, and READs that fit are still filled."""
    limit = CacheLimit(tmp_path / "cache", 3 << 20)
    env = await make_env(cache_limit=limit)
    limit.command = env.kernel.write_command  # the kernel's inuse/cull, synchronous as a write(2)
    env.kernel.layout = True
    _, first_bytes = _ingest(env, 2 << 20, name="first")
    _, second_bytes = _ingest(env, 4 << 20, name="second")
    first = await env.kernel.open(b"first")
    assert await env.kernel.read(first, 0, 2 << 20, timeout=GUARD)
    env.kernel.close(first)
    await _until(lambda: not env.kernel.fd_open(first), GUARD)
    second = await env.kernel.open(b"second")
    assert await env.kernel.read(second, 0, 2 << 20, timeout=GUARD)  # room made by culling
    assert not first.path.exists()
    assert [e for e in _events(env, "culled") if e["files"] == 1]
    assert env.kernel.cache_bytes(second)[: 2 << 20] == second_bytes[: 2 << 20]
    # 2 MiB of the open object are cached: 2 more would pass 3 MiB, and nothing is unused.
    assert not await env.kernel.read(second, 2 << 20, 2 << 20, timeout=GUARD)
    (full,) = _events(env, "cache_full")
    assert full["frontend"] == "fscache" and "above cache_max 3145728" in full["error"]
    assert not env.kernel.range_present(second, 2 << 20, PAGE)  # a hole, not zeros
    assert await env.kernel.read(second, 2 << 20, 1 << 20, timeout=GUARD)  # this one fits
    assert env.kernel.cache_bytes(second)[2 << 20 : 3 << 20] == second_bytes[2 << 20 : 3 << 20]
