# SPDX-License-Identifier: Apache-2.0
"""push -> add round trips against a real registry; add downloads only metadata."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from ondemand_d.errors import DigestMismatch, ImageError, StoreError
from ondemand_d.registry import media, reference
from ondemand_d.registry.add import add, default_name
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource
from ondemand_d.registry.upload import put_manifest, upload_blob
from ondemand_d.store.local import LocalStore

from ._proxy import Fault, FaultProxy
from .conftest import Registry, blob_bytes, make_image


async def test_round_trip_serves_identical_bytes(registry: Registry, tmp_path: Path) -> None:
    """An image pushed and added elsewhere reads back byte for byte through the source."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "rt", (40_000, 700_000, 300_000))
    ref = reference.parse(f"{registry.host}/test/roundtrip:v1")
    async with RegistryClient(RegistryConfig()) as client:
        pushed = await push(src, "rt", ref, client)
        dst = LocalStore(tmp_path / "dst")
        added = await add(dst, ref, client, name="rt-remote")
    assert pushed.uploaded == pushed.layers == 7
    assert added.manifest_digest == pushed.manifest_digest
    got = dst.get_image("rt-remote")
    assert got.bootstrap == image.bootstrap and got.devices == image.devices
    # The bootstrap is local and complete; data blobs are remote only.
    assert blob_bytes(dst, image.bootstrap) == blob_bytes(src, image.bootstrap)
    source = RegistrySource(RegistryConfig())
    try:
        for _, blob_id in image.devices:
            blob = dst.get_blob(blob_id)
            assert blob.is_remote and not any(dst.has_chunk(c.digest) for c in blob.chunks)
            data = await source.fetch(blob, blob.chunks)
            assert b"".join(data) == blob_bytes(src, blob_id)
    finally:
        await source.aclose()


async def test_add_downloads_metadata_only(registry: Registry, tmp_path: Path) -> None:
    """add fetches the manifest, config, chunk tables and bootstrap, not the data."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "meta", (8192, 2_000_000))
    ref = reference.parse(f"{registry.host}/test/meta:v1")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "meta", ref, client)
    async with RegistryClient(RegistryConfig()) as client:
        result = await add(LocalStore(tmp_path / "dst"), ref, client)
    assert result.name == "test_meta:v1"
    assert result.bytes_remote == src.get_blob(image.devices[0][1]).size
    assert result.bytes_downloaded < 20_000  # bootstrap (8 KiB, compressed) + small JSON


async def test_add_keeps_one_chunk_of_the_bootstrap_in_memory(
    registry: Registry, tmp_path: Path
) -> None:
    """A large bootstrap layer is spooled to disk: add's peak memory is far below its size."""
    import tracemalloc  # noqa: PLC0415

    src = LocalStore(tmp_path / "src")
    size = 24 << 20  # half random: the zstd layer stays above 12 MB
    image = make_image(src, tmp_path, "bigboot", (size, 8192), chunk=1 << 20)
    ref = reference.parse(f"{registry.host}/test/bigboot:v1")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "bigboot", ref, client)
    dst = LocalStore(tmp_path / "dst")
    tracemalloc.start()
    try:
        async with RegistryClient(RegistryConfig()) as client:
            await add(dst, ref, client)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob_bytes(dst, image.bootstrap) == blob_bytes(src, image.bootstrap)
    assert peak < size // 4, f"add held {peak} bytes for a {size}-byte bootstrap"


async def test_second_push_uploads_nothing(registry: Registry, tmp_path: Path) -> None:
    """Layers already in the repository are found by HEAD and not sent again."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "again", (4096, 100_000))
    ref = reference.parse(f"{registry.host}/test/again:v1")
    async with RegistryClient(RegistryConfig()) as client:
        first = await push(src, "again", ref, client)
        second = await push(src, "again", reference.parse(f"{registry.host}/test/again:v2"), client)
    assert first.uploaded == 5
    assert second.uploaded == 0 and len(second.skipped) == 5
    assert second.manifest_digest == first.manifest_digest


async def test_uncompressed_layer_is_the_blob(registry: Registry, tmp_path: Path) -> None:
    """With --no-compress the data layer is the blob's bytes (its digest is their sha256)."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "raw", (4096, 50_000))
    ref = reference.parse(f"{registry.host}/test/raw:v1")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "raw", ref, client, compress=False)
        dst = LocalStore(tmp_path / "dst")
        await add(dst, ref, client)
        manifest, _ = await client.get_manifest(ref, media.MANIFEST)
    blob = dst.get_blob(image.devices[0][1])
    layer = "sha256:" + hashlib.sha256(blob_bytes(src, blob.blob_id)).hexdigest()
    assert all(c.remote is not None and c.remote.blob == layer for c in blob.chunks)
    assert f'"{layer}"'.encode() in manifest


async def test_add_by_digest_and_name_clash(registry: Registry, tmp_path: Path) -> None:
    """A digest reference works; adding under a taken name fails unless replace=True."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "dig", (4096, 20_000))
    ref = reference.parse(f"{registry.host}/test/dig:v1")
    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(RegistryConfig()) as client:
        pushed = await push(src, "dig", ref, client)
        pinned = reference.parse(f"{registry.host}/test/dig@{pushed.manifest_digest}")
        await add(dst, pinned, client, name="dig")
        with pytest.raises(StoreError, match="exists"):
            await add(dst, pinned, client, name="dig")
        await add(dst, pinned, client, name="dig", replace=True)
    assert default_name(pinned) == f"test_dig@{pushed.manifest_digest[7:19]}"


async def test_add_refuses_foreign_manifest(registry: Registry, tmp_path: Path) -> None:
    """A manifest whose config is not ondemand-d's is refused with a clear error."""
    ref = reference.parse(f"{registry.host}/test/foreign:v1")
    config = b"{}"
    digest = "sha256:" + __import__("hashlib").sha256(config).hexdigest()
    raw = media.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media.MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest,
                "size": 2,
            },
            "layers": [],
        }
    )
    async with RegistryClient(RegistryConfig()) as client:
        await upload_blob(
            client, ref.registry, ref.repository, digest, 2, lambda o, n: config[o : o + n]
        )
        await put_manifest(client, ref, raw, media.MANIFEST)
        with pytest.raises(ImageError, match="not an ondemand-d image"):
            await add(LocalStore(tmp_path / "dst"), ref, client)


async def test_chunked_upload_path(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs above MONOLITHIC_MAX go up as PATCH parts and a closing PUT, and read back right."""
    from ondemand_d.registry import upload  # noqa: PLC0415

    monkeypatch.setattr(upload, "MONOLITHIC_MAX", 100_000)
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "parts", (4096, 450_000))
    ref = reference.parse(f"{registry.host}/test/parts:v1")
    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(RegistryConfig()) as client:
        pushed = await push(src, "parts", ref, client, compress=False)
        await add(dst, ref, client)
    assert pushed.uploaded == 5
    blob = dst.get_blob(image.devices[0][1])
    source = RegistrySource(RegistryConfig())
    try:
        assert b"".join(await source.fetch(blob, blob.chunks)) == blob_bytes(src, blob.blob_id)
    finally:
        await source.aclose()


async def test_push_survives_upload_faults(registry: Registry, tmp_path: Path) -> None:
    """A 503 on an upload step and a reset on a HEAD are retried; the pushed image is whole."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "flaky", (4096, 150_000))
    proxy = await FaultProxy(registry.host).start()
    proxy.add(Fault("status", method="PUT", match="/blobs/uploads/", status=503))
    proxy.add(Fault("status", method="POST", match="/blobs/uploads/", status=502, times=2))
    proxy.add(Fault("reset", method="HEAD"))
    cfg = RegistryConfig(retries=3, backoff_base=0.01, backoff_max=0.05)
    ref = reference.parse(f"{proxy.host}/test/flaky:v1")
    async with RegistryClient(cfg) as client:
        try:
            pushed = await asyncio.wait_for(push(src, "flaky", ref, client), 30)
        finally:
            await proxy.stop()
    assert pushed.uploaded == 5
    assert all(f.times == 0 for f in proxy.faults)
    dst = LocalStore(tmp_path / "dst")
    direct = reference.parse(f"{registry.host}/test/flaky:v1")
    async with RegistryClient(cfg) as client:
        await add(dst, direct, client)
    blob = dst.get_blob(image.devices[0][1])
    source = RegistrySource(cfg)
    try:
        data = await asyncio.wait_for(source.fetch(blob, blob.chunks), 10)
    finally:
        await source.aclose()
    assert b"".join(data) == blob_bytes(src, blob.blob_id)


@pytest.mark.parametrize("match", ["/manifests/", "/blobs/sha256:"])
async def test_add_is_all_or_nothing_on_wrong_bytes(
    registry: Registry, tmp_path: Path, match: str
) -> None:
    """A corrupted manifest (pinned by digest) or metadata blob fails add and writes nothing."""
    src = LocalStore(tmp_path / "src")
    make_image(src, tmp_path, "atomic", (4096, 60_000))
    async with RegistryClient(RegistryConfig()) as client:
        pushed = await push(
            src, "atomic", reference.parse(f"{registry.host}/test/atomic:v1"), client
        )
    proxy = await FaultProxy(registry.host).start()
    proxy.add(Fault("corrupt", match=match, times=100))
    dst = LocalStore(tmp_path / "dst")
    try:
        ref = reference.parse(f"{proxy.host}/test/atomic@{pushed.manifest_digest}")
        async with RegistryClient(RegistryConfig()) as client:
            with pytest.raises((DigestMismatch, ImageError)):
                await asyncio.wait_for(add(dst, ref, client, name="atomic"), 10)
    finally:
        await proxy.stop()
    assert list(dst.images()) == [] and dst.blob_ids() == []
    assert not any((dst.root / "chunks").rglob("*")) and not any((dst.root / "keys").iterdir())


async def test_failed_add_takes_back_what_it_wrote(registry: Registry, tmp_path: Path) -> None:
    """If the Image record cannot be written (name taken), the blobs and chunks written go."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "undo", (4096, 60_000))
    ref = reference.parse(f"{registry.host}/test/undo:v1")
    dst = LocalStore(tmp_path / "dst")
    make_image(dst, tmp_path, "taken", (4096, 8192))
    before = sorted(p.name for p in (dst.root / "chunks").rglob("*") if p.is_file())
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "undo", ref, client)
        with pytest.raises(StoreError, match="exists"):
            await add(dst, ref, client, name="taken")
    assert not dst.has_blob(image.bootstrap) and not dst.has_blob(image.devices[0][1])
    assert sorted(p.name for p in (dst.root / "chunks").rglob("*") if p.is_file()) == before
