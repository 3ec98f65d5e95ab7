# SPDX-License-Identifier: Apache-2.0
"""Registry images are untrusted: what one brings cannot change another image's bytes.

Each attack is a real image in a real registry whose config or chunk tables
were altered after push, then `add`ed; the victim is read back through the
daemon's path: `store.resolve(cookie key)`, then the ChunkFetcher with the
registry as its remote source.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ondemand_d.errors import ImageError
from ondemand_d.image.build import build_image
from ondemand_d.image.tree import directory, regular
from ondemand_d.registry import media, reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource
from ondemand_d.registry.upload import put_manifest, upload_blob
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore

from .conftest import Registry, blob_bytes, make_image


async def _served(store: LocalStore, key: bytes) -> bytes:
    """What the daemon would hand the kernel for cookie `key` (resolve, fetch, verify)."""
    blob = store.resolve(key)
    with ThreadPoolExecutor(2) as pool:
        source = RegistrySource(RegistryConfig())
        try:
            data, _ = await ChunkFetcher(store, pool, source).get(blob, blob.chunks)
        finally:
            await source.aclose()
    return b"".join(data)


async def _put(client: RegistryClient, ref: reference.Reference, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await upload_blob(client, ref.registry, ref.repository, digest, len(data),
                      lambda o, n: data[o : o + n])
    return digest


async def _tampered(
    client: RegistryClient,
    pushed: reference.Reference,
    tag: str,
    edit_config: Any = None,
    edit_table: Any = None,
) -> reference.Reference:
    """Re-publish `pushed` under `tag` with its config (and each data table) edited."""
    raw, _ = await client.get_manifest(pushed, media.MANIFEST)
    manifest = json.loads(raw)
    config = json.loads(await client.get_blob(
        pushed.registry, pushed.repository, manifest["config"]["digest"], 1 << 20))
    if edit_table is not None:
        for entry in config["devices"]:
            table = json.loads(await client.get_blob(
                pushed.registry, pushed.repository, entry["table"], 1 << 20))
            edit_table(entry, table)
            entry["table"] = await _put(client, pushed, media.dumps(table))
    if edit_config is not None:
        edit_config(config)
    body = media.dumps(config)
    manifest["config"]["digest"] = await _put(client, pushed, body)
    manifest["config"]["size"] = len(body)
    ref = reference.parse(f"{pushed.registry}/{pushed.repository}:{tag}")
    await put_manifest(client, ref, media.dumps(manifest), media.MANIFEST)
    return ref


async def test_add_with_a_device_key_equal_to_a_victims_blob_id_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    dst = LocalStore(tmp_path / "dst")
    victim = make_image(dst, tmp_path, "victim", (8192, 300_000))
    victim_id = victim.devices[0][1]
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "evil", (8192, 200_000))
    ref = reference.parse(f"{registry.host}/trust/keyhijack:v1")

    def key_is_victims_id(config: dict[str, Any]) -> None:
        config["devices"][0]["key"] = victim_id

    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "evil", ref, client)
        evil = await _tampered(client, ref, "evil", key_is_victims_id)
        with pytest.raises(ImageError, match="form of a blob id"):
            await add(dst, evil, client, name="evil")
    assert not dst.has_image("evil")
    assert await _served(dst, victim_id.encode()) == blob_bytes(dst, victim_id)


async def test_add_named_like_a_device_key_or_keyed_like_a_name_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    dst = LocalStore(tmp_path / "dst")
    victim = make_image(dst, tmp_path, "victim", (8192, 300_000))
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "evil", (8192, 200_000))
    ref = reference.parse(f"{registry.host}/trust/namehijack:v1")

    def key_is_victims_name(config: dict[str, Any]) -> None:
        config["devices"][0]["key"] = "victim"

    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "evil", ref, client)
        evil = await _tampered(client, ref, "evil", key_is_victims_name)
        with pytest.raises(Exception, match="already the name of image 'victim'"):
            await add(dst, evil, client, name="evil")
    assert await _served(dst, b"victim") == blob_bytes(dst, victim.bootstrap)


async def test_blob_id_squatting_cannot_move_a_victims_blob(
    registry: Registry, tmp_path: Path
) -> None:
    """A table claiming the victim's blob id: refused if its chunks differ, ignored if equal."""
    src = LocalStore(tmp_path / "src")
    victim = make_image(src, tmp_path, "victim", (8192, 400_000))
    make_image(src, tmp_path, "evil", (8192, 400_000))
    victim_id = victim.devices[0][1]
    vref = reference.parse(f"{registry.host}/trust/victim:v1")
    eref = reference.parse(f"{registry.host}/trust/evil:v1")
    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "victim", vref, client)
        await push(src, "evil", eref, client)
        await add(dst, vref, client, name="victim")
        victim_table = json.loads(await client.get_blob(
            vref.registry, vref.repository,
            media.ImageConfig.from_json(await client.get_blob(
                vref.registry, vref.repository,
                media.config_descriptor((await client.get_manifest(vref, media.MANIFEST))[0])[0],
                1 << 20)).devices[0].table, 1 << 20))

        def claim_id(entry: dict[str, Any], table: dict[str, Any]) -> None:
            entry["blob_id"] = table["blob_id"] = victim_id

        with pytest.raises(ImageError, match="does not match its chunk table"):
            await add(dst, await _tampered(client, eref, "claim", edit_table=claim_id), client,
                      name="evil")

        def copy_victims_table(entry: dict[str, Any], table: dict[str, Any]) -> None:
            # The victim's chunks and ranges, but read from the attacker's layer: garbage.
            table.update(victim_table)
            entry["blob_id"] = entry["key"] = victim_id
            entry["size"] = victim_table["size"]

        await add(dst, await _tampered(client, eref, "copy", edit_table=copy_victims_table),
                  client, name="evil")
    record = dst.get_blob(victim_id)
    assert record.extra["remote"]["repository"] == "trust/victim"  # still the victim's registry
    assert await _served(dst, victim_id.encode()) == blob_bytes(src, victim_id)


async def test_registry_extents_never_feed_dedup(registry: Registry, tmp_path: Path) -> None:
    """A table declaring an extent for guessed content: a later build does not reuse it."""
    secret = bytes(range(256)) * 8192  # 2 MiB the attacker can guess (say, a well-known file)
    src = LocalStore(tmp_path / "src")
    evil = make_image(src, tmp_path, "evil", (8192, 2 << 20))
    ref = reference.parse(f"{registry.host}/trust/dedup:v1")

    def poison(_entry: dict[str, Any], table: dict[str, Any]) -> None:
        table["extra"] = {"extents": [[hashlib.sha256(secret).hexdigest(), 0, len(secret)]]}

    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "evil", ref, client)
        await add(dst, await _tampered(client, ref, "poisoned", edit_table=poison), client,
                  name="evil")
    assert "extents" not in dst.get_blob(evil.devices[0][1]).extra
    root = directory(mtime_ns=10**18)
    root.children[b"well-known"] = regular(secret, mtime_ns=10**18)
    report = build_image(root, dst, "victim")
    assert report.chunks_reused == 0
    (_, data_id), = dst.get_image("victim").devices
    assert data_id != evil.devices[0][1]
    assert (await _served(dst, data_id.encode()))[: len(secret)] == secret


async def test_bootstrap_table_reaching_past_its_layer_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    """A bootstrap chunk table that points past the end of the layer add downloaded is
    refused by name, before any of its chunks is stored."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "longboot", (8192, 200_000))
    ref = reference.parse(f"{registry.host}/trust/longboot:v1")
    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "longboot", ref, client)
        raw, _ = await client.get_manifest(ref, media.MANIFEST)
        manifest = json.loads(raw)
        config = json.loads(await client.get_blob(
            ref.registry, ref.repository, manifest["config"]["digest"], 1 << 20))
        table = json.loads(await client.get_blob(
            ref.registry, ref.repository, config["bootstrap"]["table"], 1 << 20))
        table["chunks"][-1][4] += 4096  # the last chunk's layer length: past the layer's end
        config["bootstrap"]["table"] = await _put(client, ref, media.dumps(table))

        def same(config_: dict[str, Any]) -> None:
            config_["bootstrap"] = config["bootstrap"]

        evil = await _tampered(client, ref, "longboot-evil", same)
        with pytest.raises(ImageError, match="reaches past the layer's"):
            await add(dst, evil, client, name="longboot")
    assert not dst.has_image("longboot")
    assert not list((dst.root / "chunks").rglob("*"))  # nothing of it was stored
