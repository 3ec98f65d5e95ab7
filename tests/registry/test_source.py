# SPDX-License-Identifier: Apache-2.0
"""RegistrySource against a real registry behind a fault-injecting proxy.

Every fault must end in the right bytes or an error within a bound (asyncio.wait_for),
never wrong bytes and never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ondemand_d.errors import DigestMismatch, FetchError
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.source import RegistrySource, plan
from ondemand_d.store.model import Chunk, RemoteRange

from ._proxy import Fault
from .conftest import BOUND_S, FAST, Remote


def _expected(r: Remote, chunks: tuple[Chunk, ...]) -> list[bytes]:
    return [r.data[c.offset : c.end] for c in chunks]


async def test_lazy_fetch_pulls_few_bytes(remote: Remote) -> None:
    """Reading 3 chunks of a 3 MB blob moves about 3 compressed chunks over the wire."""
    source = RegistrySource(FAST)
    picks = (remote.blob.chunks[1], remote.blob.chunks[20], remote.blob.chunks[40])
    try:
        got = await asyncio.wait_for(source.fetch(remote.blob, picks), BOUND_S)
    finally:
        await source.aclose()
    assert got == _expected(remote, picks)
    wire = sum(c.remote.length for c in picks if c.remote)
    assert remote.proxy.blob_bytes == wire == source.bytes_fetched
    assert wire < remote.blob.size // 10


async def test_adjacent_chunks_share_one_range_get(remote: Remote) -> None:
    """Four neighbouring chunks are one Range GET; a separate one is a second."""
    source = RegistrySource(FAST)
    picks = (*remote.blob.chunks[4:8], remote.blob.chunks[30])
    try:
        got = await asyncio.wait_for(source.fetch(remote.blob, picks), BOUND_S)
    finally:
        await source.aclose()
    assert got == _expected(remote, picks)
    ranges = [s.range for s in remote.proxy.seen if "/blobs/" in s.path]
    assert len(ranges) == 2 and all(r and r.startswith("bytes=") for r in ranges)


TRANSIENT = [
    Fault("delay", seconds=1.5),
    Fault("stall", seconds=1.5),
    Fault("status", status=503),
    Fault("status", status=500),
    Fault("status", status=429, retry_after="0"),
    Fault("reset"),
    Fault("truncate"),
]


@pytest.mark.parametrize("fault", TRANSIENT, ids=lambda f: f"{f.kind}-{f.status}")
async def test_transient_fault_is_retried(remote: Remote, fault: Fault) -> None:
    """One failure of each kind is retried and ends in the right bytes."""
    remote.proxy.add(fault)
    source = RegistrySource(FAST)
    picks = remote.blob.chunks[2:4]
    try:
        got = await asyncio.wait_for(source.fetch(remote.blob, picks), BOUND_S)
    finally:
        await source.aclose()
    assert got == _expected(remote, picks)
    assert len([s for s in remote.proxy.seen if "/blobs/" in s.path]) == 2


@pytest.mark.parametrize("fault", TRANSIENT, ids=lambda f: f"{f.kind}-{f.status}")
async def test_persistent_fault_fails_within_bound(remote: Remote, fault: Fault) -> None:
    """A fault that never clears is a retryable FetchError, after a bounded number of tries."""
    fault.times = 100
    remote.proxy.add(fault)
    source = RegistrySource(FAST)
    try:
        with pytest.raises(FetchError) as info:
            await asyncio.wait_for(source.fetch(remote.blob, remote.blob.chunks[:1]), BOUND_S)
    finally:
        await source.aclose()
    assert info.value.retryable
    # aiohttp itself resends once when a pooled keep-alive connection turns out dead.
    assert (
        1 + FAST.retries
        <= len([s for s in remote.proxy.seen if "/blobs/" in s.path])
        <= 2 * (1 + FAST.retries)
    )


async def test_wrong_bytes_are_an_error_and_not_remembered(remote: Remote) -> None:
    """Corrupt bytes raise DigestMismatch naming blob and offset; the next fetch is right."""
    remote.proxy.add(Fault("corrupt"))
    source = RegistrySource(FAST)
    chunk = remote.blob.chunks[5]
    try:
        with pytest.raises(
            DigestMismatch, match=f"blob {remote.blob.blob_id} offset {chunk.offset}"
        ):
            await asyncio.wait_for(source.fetch(remote.blob, (chunk,)), BOUND_S)
        assert await asyncio.wait_for(source.fetch(remote.blob, (chunk,)), BOUND_S) == _expected(
            remote, (chunk,)
        )
    finally:
        await source.aclose()
    assert source.mismatches == 1


async def test_corrupt_inside_a_merged_range(remote: Remote) -> None:
    """A flipped byte in the last chunk of a merged GET fails the fetch, never returns bytes."""
    remote.proxy.add(Fault("corrupt", times=100))
    source = RegistrySource(FAST)
    try:
        with pytest.raises(DigestMismatch):
            await asyncio.wait_for(source.fetch(remote.blob, remote.blob.chunks[0:3]), BOUND_S)
    finally:
        await source.aclose()


@pytest.mark.parametrize("kind", ["ignore_range", "redirect", "widen"])
async def test_range_ignored_or_redirected_still_right(remote: Remote, kind: str) -> None:
    """A 200 with the whole blob, a 307 to storage, or a wider 206 yield exactly our chunks."""
    remote.proxy.add(Fault(kind, times=100))
    source = RegistrySource(FAST)
    picks = remote.blob.chunks[10:12]
    try:
        got = await asyncio.wait_for(source.fetch(remote.blob, picks), BOUND_S)
    finally:
        await source.aclose()
    assert got == _expected(remote, picks)
    if kind == "redirect":
        assert any(s.host.startswith("localhost") for s in remote.proxy.seen)


async def test_prefetch_reads_whole_blob_under_bandwidth_cap(remote: Remote) -> None:
    """prefetch() walks every chunk not held locally, in windows, at the capped rate."""
    rate = 4 << 20
    source = RegistrySource(RegistryConfig(prefetch_bandwidth=rate, max_range=512 << 10))
    seen: list[bytes] = []
    skip = {c.digest for c in remote.blob.chunks[:10]}

    async def fetch(group: object) -> None:
        seen.extend(await source.fetch(remote.blob, group, priority="prefetch"))  # type: ignore[arg-type]

    start = time.monotonic()
    try:
        result = await asyncio.wait_for(
            source.prefetch(remote.blob, fetch=fetch, have=lambda c: c.digest in skip), 30
        )
    finally:
        await source.aclose()
    elapsed = time.monotonic() - start
    assert result.error is None and result.chunks == len(remote.blob.chunks) - 10
    assert b"".join(seen) == remote.data[remote.blob.chunks[10].offset :]
    # The first second's worth is burst; the rest must wait for the bucket.
    assert elapsed >= (source.bytes_fetched - rate) / rate * 0.9


def test_plan_merges_only_adjacent_ranges() -> None:
    """plan() merges neighbours in one layer, splits at gaps, layers and max_range."""

    def chunk(off: int, layer: str, roff: int) -> Chunk:
        return Chunk(off, 4096, "0" * 64, RemoteRange(layer, roff, 100, "zstd"))

    chunks = [
        chunk(0, "a", 0),
        chunk(4096, "a", 100),
        chunk(8192, "a", 300),
        chunk(12288, "b", 200),
        chunk(16384, "a", 200),
    ]
    runs = plan(chunks, max_range=250)
    assert [(r.layer, r.offset, r.length, r.members) for r in runs] == [
        ("a", 0, 200, (0, 1)),
        ("a", 200, 200, (4, 2)),
        ("b", 200, 100, (3,)),
    ]


async def test_prefetching_context_sets_priority_for_this_task_only(remote: Remote) -> None:
    """Inside prefetching(), fetch() without a priority runs at prefetch priority (capped)."""
    source = RegistrySource(RegistryConfig(prefetch_bandwidth=1 << 20))
    seen: list[str] = []
    real = source.client.get_range

    async def spy(*args: object) -> bytes:
        seen.append(str(args[-1]))
        return await real(*args)  # type: ignore[arg-type]

    source.client.get_range = spy  # type: ignore[method-assign,assignment]
    try:
        with source.prefetching():
            await asyncio.wait_for(source.fetch(remote.blob, remote.blob.chunks[:1]), BOUND_S)
        await asyncio.wait_for(source.fetch(remote.blob, remote.blob.chunks[1:2]), BOUND_S)
    finally:
        await source.aclose()
    assert seen == ["prefetch", "demand"]


async def test_fetch_deadline_bounds_a_demand_read(remote: Remote) -> None:
    """However many retries remain, a demand fetch gives up at fetch_deadline."""
    remote.proxy.add(Fault("delay", seconds=5, times=100))
    cfg = RegistryConfig(read_timeout=4, retries=10, backoff_base=0.01, fetch_deadline=1.0)
    source = RegistrySource(cfg)
    start = time.monotonic()
    try:
        with pytest.raises(FetchError, match="not fetched within 1 s") as info:
            await asyncio.wait_for(source.fetch(remote.blob, remote.blob.chunks[:1]), BOUND_S)
    finally:
        await source.aclose()
    assert info.value.retryable
    assert time.monotonic() - start < 2


@given(
    st.lists(
        st.tuples(st.sampled_from("ab"), st.integers(0, 40), st.integers(1, 3)),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 8),
)
def test_plan_property(spec: list[tuple[str, int, int]], max_units: int) -> None:
    """Every chunk lands in exactly one run, inside it; runs are contiguous and capped."""
    unit = 100
    chunks = [
        Chunk(i * 4096, 4096, "0" * 64, RemoteRange(layer, slot * unit, n * unit, "zstd"))
        for i, (layer, slot, n) in enumerate(spec)
    ]
    runs = plan(chunks, max_range=max_units * unit)
    members = sorted(i for r in runs for i in r.members)
    assert members == list(range(len(chunks)))
    for r in runs:
        for i in r.members:
            rr = chunks[i].remote
            assert rr is not None and rr.blob == r.layer
            assert r.offset <= rr.offset and rr.offset + rr.length <= r.offset + r.length
        assert r.length <= max_units * unit or len({chunks[i].remote for i in r.members}) == 1


async def test_concurrency_per_registry_is_bounded(remote: Remote) -> None:
    """Twelve separate ranges with concurrency=3 never have more than 3 requests in flight."""
    remote.proxy.add(Fault("delay", seconds=0.1, times=100))
    source = RegistrySource(RegistryConfig(concurrency=3, prefetch_concurrency=1))
    picks = remote.blob.chunks[0:24:2]  # no two adjacent: twelve Range GETs
    try:
        got = await asyncio.wait_for(source.fetch(remote.blob, picks), BOUND_S)
    finally:
        await source.aclose()
    assert got == _expected(remote, picks)
    assert remote.proxy.max_inflight == 3
    assert len([s for s in remote.proxy.seen if "/blobs/" in s.path]) == 12


async def test_retry_after_is_honoured(remote: Remote) -> None:
    """A 429 with Retry-After: 1 delays the retry by about a second, not the backoff's 10 ms."""
    remote.proxy.add(Fault("status", status=429, retry_after="1"))
    source = RegistrySource(FAST)
    start = time.monotonic()
    try:
        got = await asyncio.wait_for(source.fetch(remote.blob, remote.blob.chunks[:1]), BOUND_S)
    finally:
        await source.aclose()
    assert got == _expected(remote, remote.blob.chunks[:1])
    assert 0.9 <= time.monotonic() - start < 3


async def test_demand_is_not_stuck_behind_a_capped_prefetch(remote: Remote) -> None:
    """While a slow (capped) prefetch walks the blob, a demand fetch completes at once."""
    source = RegistrySource(RegistryConfig(prefetch_bandwidth=200_000, max_range=256 << 10))
    prefetch = asyncio.create_task(source.prefetch(remote.blob))
    try:
        await asyncio.sleep(0.3)  # let it start and run into the cap
        start = time.monotonic()
        last = remote.blob.chunks[-2:]
        got = await asyncio.wait_for(source.fetch(remote.blob, last), BOUND_S)
        assert time.monotonic() - start < 1.0
        assert got == _expected(remote, last)
        assert not prefetch.done()
    finally:
        prefetch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prefetch
        await source.aclose()
