# SPDX-License-Identifier: Apache-2.0
"""A daemon Service wired to the fake kernel, a real LocalStore and real cache files."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from fakekernel import FakeKernel, RecordingBackend
from ondemand_d._native import load_backend
from ondemand_d.device import Device
from ondemand_d.service import Service
from ondemand_d.store.fetch import ChunkFetcher, RemoteSource
from ondemand_d.store.local import LocalStore


@dataclass
class Env:
    store: LocalStore
    kernel: FakeKernel
    service: Service
    fetcher: ChunkFetcher
    logs: list[dict]
    tmp: Path


@pytest.fixture(params=["cffi", "python"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_env(tmp_path: Path, backend_name: str):
    """Start a Service; `await make_env(remote=..., concurrency=...)`."""
    made: list[tuple[Service, FakeKernel, ThreadPoolExecutor]] = []
    cm = structlog.testing.capture_logs()
    logs = cm.__enter__()

    async def make(remote: RemoteSource | None = None, **kw) -> Env:
        base = tmp_path if not made else tmp_path / f"env{len(made)}"
        store = LocalStore(base / "store")
        (base / "cache").mkdir(parents=True, exist_ok=True)
        kernel = FakeKernel(base / "cache")
        kernel.start()
        executor = ThreadPoolExecutor(4)
        fetcher = ChunkFetcher(store, executor, remote)
        backend = RecordingBackend(load_backend(backend_name), kernel)
        service = Service(Device(kernel.device_fd, Path("fake")), store, fetcher, backend,
                          executor, **kw)
        service.start()
        made.append((service, kernel, executor))
        return Env(store, kernel, service, fetcher, logs, base)

    yield make
    for service, kernel, executor in made:
        await service.drain(5)
        kernel.stop()
        executor.shutdown()
    cm.__exit__(None, None, None)


@pytest.fixture
async def env(make_env) -> Env:
    return await make_env()
