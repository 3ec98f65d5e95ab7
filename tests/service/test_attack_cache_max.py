# SPDX-License-Identifier: Apache-2.0
"""cache_max on the fscache front end (fake kernel): prefetch and readahead stop at it; a
READ is still answered, with its bytes."""
from __future__ import annotations

from ondemand_d import cachedir
from ondemand_d.fill import CacheLimit

from .test_service import PAGE, _events, _ingest, _until

GUARD = 10.0


async def test_attack_prefetch_stops_at_cache_max(make_env, tmp_path):
    """A 9 MiB data blob prefetched under a 4 MiB cache_max: the prefetch writes no more than
    the limit and says why; a READ past it is still filled."""
    env = await make_env(prefetch=True, cache_limit=CacheLimit(tmp_path / "cache", 4 << 20))
    env.kernel.layout = True  # cache files where cachefiles puts them: what cache_max counts
    blob, source = _ingest(env, (9 << 20) + 4321)
    obj = await env.kernel.open(b"data")
    await _until(lambda: _events(env, "prefilled"), GUARD)
    (done,) = _events(env, "prefilled")
    assert done["outcome"] == "ok"
    assert "stopped at cache_max" in done["note"] and str(4 << 20) in done["note"]
    held = cachedir.file_data_bytes(obj.path)
    assert 0 < held <= 4 << 20 and done["bytes"] == held
    assert await env.kernel.read(obj, 8 << 20, PAGE, timeout=GUARD)  # READs are answered
    assert env.kernel.cache_bytes(obj)[8 << 20 : (8 << 20) + PAGE] == source[
        8 << 20 : (8 << 20) + PAGE]


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
