# SPDX-License-Identifier: Apache-2.0
"""RegistrySource under the daemon's ChunkFetcher: single-flight, write-through, no bad cache."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ondemand_d.errors import DigestMismatch
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.source import RegistrySource
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore

from ._proxy import Fault
from .conftest import BOUND_S, FAST, Remote


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown()


async def test_concurrent_reads_fetch_once_and_write_through(
    remote: Remote, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    """Five READs of the same chunks cost one Range GET; afterwards the chunks are local."""
    store = LocalStore(tmp_path / "dst")  # the fixture's added store
    source = RegistrySource(FAST)
    fetcher = ChunkFetcher(store, executor, source, write_through=True, cache_bytes=0)
    picks = remote.blob.chunks[3:5]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(fetcher.get(remote.blob, picks) for _ in range(5))), BOUND_S
        )
    finally:
        await source.aclose()
    want = [remote.data[c.offset : c.end] for c in picks]
    assert all(data == want for data, _ in results)
    assert len([s for s in remote.proxy.seen if "/blobs/" in s.path]) == 1
    assert all(store.has_chunk(c.digest) for c in picks)


async def test_mismatch_is_not_kept(
    remote: Remote, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    """Wrong bytes fail the READ and are not written through; the next READ gets them right."""
    store = LocalStore(tmp_path / "dst")
    remote.proxy.add(Fault("corrupt"))
    source = RegistrySource(RegistryConfig())
    fetcher = ChunkFetcher(store, executor, source, write_through=True, cache_bytes=0)
    chunk = remote.blob.chunks[7]
    try:
        with pytest.raises(DigestMismatch):
            await asyncio.wait_for(fetcher.get(remote.blob, (chunk,)), BOUND_S)
        assert not store.has_chunk(chunk.digest)
        data, _ = await asyncio.wait_for(fetcher.get(remote.blob, (chunk,)), BOUND_S)
    finally:
        await source.aclose()
    assert data == [remote.data[chunk.offset : chunk.end]]
    assert store.has_chunk(chunk.digest)


async def test_a_damaged_local_chunk_is_fetched_again_and_rewritten(
    remote: Remote, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    """Write-through heals: a local chunk that fails its digest is fetched and replaced."""
    store = LocalStore(tmp_path / "dst")
    source = RegistrySource(FAST)
    fetcher = ChunkFetcher(store, executor, source, write_through=True, cache_bytes=0)
    chunk = remote.blob.chunks[2]
    want = [remote.data[chunk.offset : chunk.end]]
    try:
        assert (await asyncio.wait_for(fetcher.get(remote.blob, (chunk,)), BOUND_S))[0] == want
        path = store.chunk_path(chunk.digest)
        path.chmod(0o644)
        path.write_bytes(b"")  # empty, as a power loss can leave it
        data, where = await asyncio.wait_for(fetcher.get(remote.blob, (chunk,)), BOUND_S)
    finally:
        await source.aclose()
    assert (data, where) == (want, "remote")
    assert store.chunk_ok(chunk.digest, chunk.length)
