# SPDX-License-Identifier: Apache-2.0
"""The daemon serving a registry image to the fake kernel, through faults.

Every READ ends in data that matches the image or in an error completion,
within a bound; after a fault clears, the same daemon serves the same range.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakekernel import FakeKernel, RecordingBackend

from ondemand_d._native import load_backend
from ondemand_d.device import Device
from ondemand_d.registry.source import RegistrySource
from ondemand_d.service import Service
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore

from ._proxy import Fault
from .conftest import BOUND_S, FAST, Remote

PAGE = 4096


@dataclass
class Daemon:
    kernel: FakeKernel
    service: Service
    source: RegistrySource
    store: LocalStore


@pytest.fixture
async def daemon(remote: Remote, tmp_path: Path) -> AsyncIterator[Daemon]:
    """A Service over the store `remote` was added to, with a RegistrySource and write-through."""
    store = LocalStore(tmp_path / "dst")
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.start()
    executor = ThreadPoolExecutor(2)
    source = RegistrySource(FAST)
    fetcher = ChunkFetcher(store, executor, source, write_through=True)
    backend = RecordingBackend(load_backend("python"), kernel)
    service = Service(Device(kernel.device_fd, Path("fake")), store, fetcher, backend, executor)
    service.start()
    try:
        yield Daemon(kernel, service, source, store)
    finally:
        await service.drain(5)
        kernel.stop()
        executor.shutdown()
        await source.aclose()


async def test_reads_fetch_lazily_and_survive_faults(remote: Remote, daemon: Daemon) -> None:
    """Reads are right and cheap; wrong bytes and 5xx fail only their READ, then recover."""
    obj = await daemon.kernel.open(remote.blob.blob_id.encode())
    assert obj.copen_result == remote.blob.size
    chunk = remote.blob.chunks

    assert await daemon.kernel.read(obj, chunk[2].offset, PAGE, timeout=BOUND_S)
    got = daemon.kernel.cache_bytes(obj)[chunk[2].offset : chunk[2].offset + PAGE]
    assert got == remote.data[chunk[2].offset : chunk[2].offset + PAGE]
    assert remote.proxy.blob_bytes < remote.blob.size // 20

    for fault in (Fault("corrupt", times=100), Fault("status", status=503, times=100)):
        target = chunk[10 if fault.kind == "corrupt" else 20]
        remote.proxy.add(fault)
        assert not await daemon.kernel.read(obj, target.offset, PAGE, timeout=BOUND_S)
        assert not daemon.store.has_chunk(target.digest)  # nothing wrong was kept
        fault.times = 0
        assert await daemon.kernel.read(obj, target.offset, PAGE, timeout=BOUND_S)
        start = target.offset
        assert (
            daemon.kernel.cache_bytes(obj)[start : start + PAGE]
            == remote.data[start : start + PAGE]
        )
        assert daemon.store.has_chunk(target.digest)  # written through
    assert daemon.source.mismatches == 1
    assert not daemon.kernel.bad_completions


async def test_registry_source_is_warmed_up_only_for_stores_with_registry_blobs(
    remote: Remote, tmp_path: Path
) -> None:
    """`serve` creates the registry source after ready when the store needs it, not otherwise."""
    from ondemand_d.config import Config
    from ondemand_d.daemon import LazyRemoteSource

    added = LazyRemoteSource(Config())
    assert added.warm_up(LocalStore(tmp_path / "dst")) is True
    assert added.stats() == {"registry_requests": 0, "registry_bytes": 0, "registry_chunks": 0,
                             "registry_mismatches": 0}  # created, nothing fetched yet
    local_only = LazyRemoteSource(Config())
    assert local_only.warm_up(LocalStore(tmp_path / "src")) is False
    assert local_only.stats() == {}  # never created
    await added.aclose()
