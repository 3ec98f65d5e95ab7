# SPDX-License-Identifier: Apache-2.0
"""Attacks on what an image may cost: a registry that declares more than it sends.

Each is a real image pushed to the loopback registry, then re-published with a
crafted bootstrap or data table, and `add`ed through a proxy that records every
request: the add is refused with one sentence, the store is unchanged, and
nothing past the config blob was downloaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from ondemand_d.cli import main
from ondemand_d.errors import ImageError
from ondemand_d.registry import media, reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.upload import put_manifest, upload_blob
from ondemand_d.store.limits import DEFAULT_MAX_BOOTSTRAP, DEFAULT_MAX_IMAGE, ImageBudget
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Chunk, content_id

from ._proxy import FaultProxy
from .conftest import Registry, make_image

CHUNK = 4 << 20  # the store's default max_chunk: every chunk of the bomb passes that cap


async def _put(client: RegistryClient, ref: reference.Reference, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await upload_blob(client, ref.registry, ref.repository, digest, len(data),
                      lambda o, n: data[o : o + n])
    return digest


def _bomb(total: int) -> tuple[media.ChunkTable, bytes]:
    """A zstd layer of `total` decoded bytes in CHUNK-sized frames, each one different (so the
    store cannot dedup them) and each a few hundred bytes on the wire."""
    rows, layer = [], bytearray()
    cctx = zstandard.ZstdCompressor(level=19)
    for i in range(total // CHUNK):
        data = i.to_bytes(8, "little") + bytes(CHUNK - 8)
        frame = cctx.compress(data)
        rows.append((Chunk(i * CHUNK, CHUNK, hashlib.sha256(data).hexdigest()), len(layer),
                     len(frame)))
        layer += frame
    chunks = [c for c, _, _ in rows]
    return media.ChunkTable(content_id(total, chunks), total, "zstd", tuple(rows), {}), bytes(layer)


def _huge_table(total: int) -> media.ChunkTable:
    """A data table declaring `total` bytes whose layer does not exist (never fetched)."""
    rows = tuple((Chunk(i * CHUNK, CHUNK, hashlib.sha256(b"%d" % i).hexdigest()), i * 100, 100)
                 for i in range(total // CHUNK))
    return media.ChunkTable(content_id(total, [c for c, _, _ in rows]), total, "zstd", rows, {})


async def _republish(client: RegistryClient, pushed: reference.Reference, tag: str,
                     edit: Any) -> reference.Reference:
    raw, _ = await client.get_manifest(pushed, media.MANIFEST)
    manifest = json.loads(raw)
    config = json.loads(await client.get_blob(
        pushed.registry, pushed.repository, manifest["config"]["digest"], 1 << 20))
    await edit(config)
    body = media.dumps(config)
    manifest["config"]["digest"] = await _put(client, pushed, body)
    manifest["config"]["size"] = len(body)
    ref = reference.parse(f"{pushed.registry}/{pushed.repository}:{tag}")
    await put_manifest(client, ref, media.dumps(manifest), media.MANIFEST)
    return ref


def _files(store: LocalStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


async def _published(registry: Registry, tmp_path: Path, repo: str, edit: Any
                     ) -> reference.Reference:
    """A small image pushed, then re-published as tag `evil` with its config edited."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "small", (8192, 100_000))
    ref = reference.parse(f"{registry.host}/attack/{repo}:v1")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "small", ref, client)
        return await _republish(client, ref, "evil", lambda c: edit(client, ref, c))


async def test_attack_bootstrap_bomb_is_refused_before_decoding(
        registry: Registry, tmp_path: Path) -> None:
    """A 1 GiB bootstrap in a layer of a few tens of KiB: refused, nothing of it downloaded."""
    table, layer = _bomb(1 << 30)
    assert len(layer) < 128 << 10 and table.size > DEFAULT_MAX_BOOTSTRAP
    bomb: dict[str, str] = {}

    async def edit(client: RegistryClient, ref: reference.Reference, config: dict[str, Any]
                   ) -> None:
        bomb["data"] = await _put(client, ref, layer)
        config["bootstrap"].update(blob_id=table.blob_id, size=table.size, data=bomb["data"],
                                   table=await _put(client, ref, table.to_json()))

    evil = await _published(registry, tmp_path, "bomb", edit)
    dst = LocalStore(tmp_path / "dst")
    make_image(dst, tmp_path, "victim", (8192, 30_000))
    before = _files(dst)
    proxy = await FaultProxy(registry.host).start()
    try:
        via = reference.parse(f"{proxy.host}/{evil.repository}:evil")
        async with RegistryClient(RegistryConfig()) as client:
            with pytest.raises(ImageError, match=(
                    rf"image {proxy.host}/attack/bomb:evil is refused: its bootstrap is "
                    rf"{1 << 30} bytes, above the cap of {DEFAULT_MAX_BOOTSTRAP} "
                    r"\(raise max_bootstrap")):
                await add(dst, via, client, name="evil")
    finally:
        await proxy.stop()
    assert _files(dst) == before
    assert not dst.has_image("evil")
    assert not any(bomb["data"] in s.path for s in proxy.seen)
    # Only the manifest and the config blob were asked for.
    assert [s.path.split("/")[-2] for s in proxy.seen if s.method == "GET"] == [
        "manifests", "blobs"]


async def test_attack_bootstrap_cap_is_the_configured_one(
        registry: Registry, tmp_path: Path) -> None:
    """The cap is the one given: 64 MiB is refused under 32 MiB and added under 64 MiB."""
    table, layer = _bomb(64 << 20)

    async def edit(client: RegistryClient, ref: reference.Reference, config: dict[str, Any]
                   ) -> None:
        config["bootstrap"].update(blob_id=table.blob_id, size=table.size,
                                   data=await _put(client, ref, layer),
                                   table=await _put(client, ref, table.to_json()))

    evil = await _published(registry, tmp_path, "bomb-cap", edit)
    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(RegistryConfig()) as client:
        with pytest.raises(ImageError, match=r"its bootstrap is 67108864 bytes, above the cap "
                           r"of 33554432"):
            await add(dst, evil, client, budget=ImageBudget(max_bootstrap=32 << 20))
        result = await add(dst, evil, client, name="bomb",
                           budget=ImageBudget(max_bootstrap=64 << 20))
    assert result.blobs == 2  # a trusted big bootstrap is added when the cap is raised


async def test_attack_huge_declared_image_is_refused_before_its_tables(
        registry: Registry, tmp_path: Path) -> None:
    """A data blob declaring 100 GiB: refused from the config blob, no table downloaded."""
    table = _huge_table(100 << 30)

    async def edit(client: RegistryClient, ref: reference.Reference, config: dict[str, Any]
                   ) -> None:
        config["devices"][0].update(blob_id=table.blob_id, size=table.size,
                                    table=await _put(client, ref, table.to_json()))

    evil = await _published(registry, tmp_path, "huge", edit)
    dst = LocalStore(tmp_path / "dst")
    before = _files(dst)
    proxy = await FaultProxy(registry.host).start()
    try:
        via = reference.parse(f"{proxy.host}/{evil.repository}:evil")
        async with RegistryClient(RegistryConfig()) as client:
            with pytest.raises(ImageError, match=(
                    rf"it declares {(100 << 30) + 8192} bytes in all, above the cap of "
                    rf"{DEFAULT_MAX_IMAGE} \(raise max_image in the configuration or pass "
                    r"--max-image")):
                await add(dst, via, client)
    finally:
        await proxy.stop()
    assert _files(dst) == before
    assert [s.path.split("/")[-2] for s in proxy.seen if s.method == "GET"] == [
        "manifests", "blobs"]


def test_attack_bomb_through_the_cli_is_one_sentence(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ondemand-d add` says it in one line, exit code 1 style, no traceback; the flag raises
    the cap."""
    import asyncio  # noqa: PLC0415

    table, layer = _bomb(16 << 20)

    async def edit(client: RegistryClient, ref: reference.Reference, config: dict[str, Any]
                   ) -> None:
        config["bootstrap"].update(blob_id=table.blob_id, size=table.size,
                                   data=await _put(client, ref, layer),
                                   table=await _put(client, ref, table.to_json()))

    evil = asyncio.run(_published(registry, tmp_path, "bomb-cli", edit))
    store = str(tmp_path / "dst")
    code = main(["--store", store, "add", str(evil), "--max-bootstrap", "8M"])
    err = capsys.readouterr().err
    assert code != 0
    assert "is refused: its bootstrap is 16777216 bytes, above the cap of 8388608" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--store", store, "add", str(evil), "--max-bootstrap", "16M"]) == 0
