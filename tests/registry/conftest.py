# SPDX-License-Identifier: Apache-2.0
"""Fixtures: real registries on 127.0.0.1 (plain, htpasswd, token, TLS), images, a fault proxy.

The plain registry is shared by the session's tests (each test uses its own
repository name); see _server.py for how registries are started.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Image

from ._proxy import FaultProxy
from ._server import PASSWORD, USER, Registry, start_registry, stop_registry

__all__ = ["PASSWORD", "USER", "Registry"]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry without authentication."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    stop_registry(reg)


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry that wants HTTP basic credentials (htpasswd, bcrypt)."""
    reg = start_registry(tmp_path_factory.mktemp("registry-htpasswd"), "htpasswd")
    yield reg
    stop_registry(reg)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry that wants bearer tokens from the test token server."""
    reg = start_registry(tmp_path_factory.mktemp("registry-token"), "token")
    yield reg
    stop_registry(reg)


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry on 127.0.0.1 over TLS, its certificate signed by a throwaway CA."""
    reg = start_registry(tmp_path_factory.mktemp("registry-tls"), "tls")
    yield reg
    stop_registry(reg)


def docker_config(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    """Write a Docker-style config.json with basic credentials for `host`."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def make_image(
    store: LocalStore, workdir: Path, name: str, sizes: tuple[int, ...], chunk: int = 64 << 10
) -> Image:
    """An image of a random bootstrap and data blobs (not a real EROFS; the store does not care)."""
    import random  # noqa: PLC0415

    rng = random.Random(name)
    blobs = []
    for i, size in enumerate(sizes):
        # Half random, half text-like, so zstd has something to do and something not.
        data = bytearray(rng.randbytes(size // 2))
        data += (f"line {i} " * (size // 7 + 1)).encode()[: size - len(data)]
        path = workdir / f"{name}-{i}.bin"
        path.write_bytes(bytes(data))
        blobs.append(store.ingest_file(path, chunk_size=chunk))
    boot, *data_blobs = blobs
    image = Image(name, boot.blob_id, tuple((b.blob_id, b.blob_id) for b in data_blobs))
    store.put_image(image)
    return image


def blob_bytes(store: LocalStore, blob_id: str) -> bytes:
    blob = store.get_blob(blob_id)
    return b"".join(store.read_chunk(c) for c in blob.chunks)


#: Every fault test must finish within this many seconds (asyncio.wait_for).
BOUND_S = 10.0
#: Short timeouts and backoff, so a fault costs the tests little time.
FAST = RegistryConfig(
    read_timeout=0.5, request_timeout=2.0, retries=2, backoff_base=0.01, backoff_max=0.05
)


@dataclass
class Remote:
    proxy: FaultProxy
    blob: Blob  # as added through the proxy
    data: bytes  # the blob's true bytes


@pytest.fixture
async def remote(registry: Registry, tmp_path: Path) -> AsyncIterator[Remote]:
    """An image pushed to the registry and added (to tmp_path/dst) through a fault proxy."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "lazy", (8192, 3_000_000))
    proxy = await FaultProxy(registry.host).start()
    try:
        dst = LocalStore(tmp_path / "dst")
        async with RegistryClient(RegistryConfig()) as client:
            await push(src, "lazy", reference.parse(f"{registry.host}/test/lazy:v1"), client)
            await add(dst, reference.parse(f"{proxy.host}/test/lazy:v1"), client)
        blob_id = image.devices[0][1]
        proxy.blob_bytes = 0
        proxy.seen.clear()
        yield Remote(proxy, dst.get_blob(blob_id), blob_bytes(src, blob_id))
    finally:
        await proxy.stop()
