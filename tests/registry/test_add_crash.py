# SPDX-License-Identifier: Apache-2.0
"""`add` under the crash matrix, and the chunk-size cap on what a registry declares."""
from __future__ import annotations

import asyncio
import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import crashlib
from ondemand_d.errors import ImageError
from ondemand_d.registry import media, reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Chunk, content_id

from .conftest import Registry, make_image
from .test_trust import _tampered


def _remote_snapshot(store: LocalStore, name: str) -> crashlib.Snapshot | None:
    """(key, sha256) of each blob of image `name`, resolved and fetched as the daemon would."""
    if not store.has_image(name):
        return None

    async def go() -> crashlib.Snapshot:
        image = store.get_image(name)
        source = RegistrySource(RegistryConfig())
        out = []
        try:
            with ThreadPoolExecutor(2) as pool:
                fetcher = ChunkFetcher(store, pool, source)
                for key in (name, *(k for k, _ in image.devices)):
                    blob = store.resolve(key.encode())
                    data, _ = await fetcher.get(blob, blob.chunks)
                    out.append((key.encode(), hashlib.sha256(b"".join(data)).hexdigest()))
        finally:
            await source.aclose()
        return tuple(out)

    return asyncio.run(go())


def test_add_replace_crash_matrix(registry: Registry, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9, ENOSPC, EIO at every step of `add --replace`: old or new, never broken."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "v1", (8192, 150_000))
    make_image(src, tmp_path, "v2", (12288, 90_000, 70_000))
    v1 = reference.parse(f"{registry.host}/crash/app:v1")
    v2 = reference.parse(f"{registry.host}/crash/app:v2")
    base = tmp_path / "base"

    async def prepare() -> None:
        async with RegistryClient(RegistryConfig()) as client:
            await push(src, "v1", v1, client)
            await push(src, "v2", v2, client)
            await add(LocalStore(base), v1, client, name="app")

    asyncio.run(prepare())
    make_image(LocalStore(base), tmp_path, "local", (8192, 100_000))

    def op(store: LocalStore) -> None:
        async def go() -> None:
            async with RegistryClient(RegistryConfig()) as client:
                await add(store, v2, client, name="app", replace=True)

        asyncio.run(go())

    monkeypatch.setattr(crashlib, "snapshot", _remote_snapshot)
    scratch = tmp_path / "scratch"
    shutil.copytree(base, scratch)
    before = {n: _remote_snapshot(LocalStore(base), n) for n in ("app", "local")}
    op(LocalStore(scratch))
    after = _remote_snapshot(LocalStore(scratch), "app")
    assert after != before["app"]
    outcomes = crashlib.run_matrix(
        base, tmp_path / "work", op,
        {"app": {before["app"], after}, "local": {before["local"]}}, {"app": after})
    assert outcomes["killed"] and outcomes["failed"], outcomes


def test_add_refuses_chunks_above_the_cap(registry: Registry, tmp_path: Path) -> None:
    """A table declaring a 1 GiB chunk (a tiny zstd layer could) is refused at add."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "huge", (8192, 100_000))
    ref = reference.parse(f"{registry.host}/cap/huge:v1")

    def one_giant_chunk(entry: dict[str, Any], table: dict[str, Any]) -> None:
        first = table["chunks"][0]
        table["chunks"] = [[0, 1 << 30, first[2], first[3], first[4]]]
        table["size"] = entry["size"] = 1 << 30
        # A consistent table (its id is its content id): only the size is the problem.
        table["blob_id"] = entry["blob_id"] = entry["key"] = content_id(
            1 << 30, (Chunk(0, 1 << 30, first[2]),))

    async def go() -> None:
        async with RegistryClient(RegistryConfig()) as client:
            await push(src, "huge", ref, client)
            bad = await _tampered(client, ref, "giant", edit_table=one_giant_chunk)
            with pytest.raises(ImageError, match="above the store's cap"):
                await add(LocalStore(tmp_path / "dst"), bad, client, name="huge")

    asyncio.run(go())
    assert list(LocalStore(tmp_path / "dst").images()) == []
