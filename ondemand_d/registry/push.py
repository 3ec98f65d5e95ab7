# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d push`: upload an image from the LocalStore to a registry (layout in media.py).

Each blob is spooled once to a temporary file under the store's tmp/ (chunks
read and verified from the store, each compressed to its own zstd frame), which
gives the layer digest before anything is sent: a HEAD then tells whether the
registry already has it, and only missing layers are uploaded. Compression is
deterministic (fixed level, no threads), so pushing the same blob twice yields
the same layer and the second push uploads nothing.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import structlog
import zstandard

from ondemand_d.errors import ChunkNotFound, StoreError
from ondemand_d.registry import media
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.reference import Reference
from ondemand_d.registry.upload import put_manifest, upload_blob
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk

log = structlog.get_logger()
ZSTD_LEVEL = 3
PROGRESS_EVERY_S = 5.0
Progress = Callable[[str], None]


@dataclass
class PushResult:
    reference: str
    manifest_digest: str = ""
    layers: int = 0
    uploaded: int = 0
    bytes_uploaded: int = 0
    bytes_blobs: int = 0  # uncompressed size of the image's blobs
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Layer:
    digest: str
    size: int
    media_type: str


def _spool(
    store: LocalStore, blob: Blob, out: IO[bytes], compress: bool, progress: Progress
) -> tuple[_Layer, media.ChunkTable]:
    """Write the blob's data layer to `out`; return the layer and its chunk table."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False)
    digest = hashlib.sha256()
    rows = []
    pos = 0
    last = time.monotonic()
    for i, chunk in enumerate(blob.chunks):
        try:
            data = store.read_chunk(chunk)
        except ChunkNotFound:
            msg = (
                f"blob {blob.blob_id}: chunk at {chunk.offset} is not in the local store "
                "(an image added from a registry can only be pushed once fully read)"
            )
            raise StoreError(msg) from None
        frame = cctx.compress(data) if compress else data
        out.write(frame)
        digest.update(frame)
        rows.append((chunk, pos, len(frame)))
        pos += len(frame)
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            progress(f"  preparing blob {blob.blob_id[:12]}: {100 * (i + 1) // len(blob.chunks)}%")
    out.flush()
    extra = {k: v for k, v in blob.extra.items() if k != "remote"}
    table = media.ChunkTable(
        blob.blob_id,
        blob.size,
        "zstd" if compress else "none",
        tuple((Chunk(c.offset, c.length, c.digest), o, n) for c, o, n in rows),
        extra,
    )
    layer = _Layer("sha256:" + digest.hexdigest(), pos, media.BLOB_ZSTD if compress else media.BLOB)
    return layer, table


async def _ensure(  # noqa: PLR0913
    client: RegistryClient,
    ref: Reference,
    layer: _Layer,
    read: Callable[[int, int], bytes],
    result: PushResult,
    what: str,
    progress: Progress,
) -> None:
    """Upload a layer unless the repository has it already."""
    result.layers += 1
    if await client.has_blob(ref.registry, ref.repository, layer.digest, actions="pull,push"):
        result.skipped.append(layer.digest)
        progress(f"  {what}: already in the registry ({human_size(layer.size)})")
        return
    start = time.monotonic()

    def sent(done: int) -> None:
        if done < layer.size:
            progress(f"  {what}: {human_size(done)} of {human_size(layer.size)} sent")

    await upload_blob(
        client, ref.registry, ref.repository, layer.digest, layer.size, read, progress=sent
    )
    result.uploaded += 1
    result.bytes_uploaded += layer.size
    seconds = time.monotonic() - start
    progress(f"  {what}: uploaded {human_size(layer.size)} in {seconds:.1f} s")
    log.info(
        "registry_layer_uploaded",
        registry=ref.registry,
        repository=ref.repository,
        digest=layer.digest,
        len=layer.size,
        duration_ms=round(seconds * 1000),
    )


async def push(  # noqa: PLR0913
    store: LocalStore,
    name: str,
    ref: Reference,
    client: RegistryClient,
    *,
    compress: bool = True,
    progress: Progress = lambda _: None,
) -> PushResult:
    """Upload image `name` from `store` to `ref`; return what was done.

    Raises:
        UnknownName: no such image. StoreError: a chunk is missing or corrupt locally.
        FetchError: the registry refused or failed.
    """
    image = store.get_image(name)
    result = PushResult(str(ref))
    layers: list[dict[str, Any]] = []
    entries: list[media.BlobEntry] = []
    slots = [("", image.bootstrap), *image.devices]
    for n, (key, blob_id) in enumerate(slots, 1):
        blob = store.get_blob(blob_id)
        result.bytes_blobs += blob.size
        kind = "bootstrap" if n == 1 else "data" if key == blob_id else f"device {key}"
        progress(f"blob {n}/{len(slots)}: {kind} {blob_id[:12]}, {human_size(blob.size)}")
        with tempfile.TemporaryFile(dir=store.root / "tmp") as spool:
            layer, table = _spool(store, blob, spool, compress, progress)

            def read(offset: int, size: int, f: IO[bytes] = spool) -> bytes:
                f.seek(offset)
                return f.read(size)

            await _ensure(client, ref, layer, read, result, "data", progress)
        table_bytes = table.to_json()
        table_layer = _Layer(
            "sha256:" + hashlib.sha256(table_bytes).hexdigest(), len(table_bytes), media.CHUNKS
        )
        await _ensure(
            client, ref, table_layer, _reader(table_bytes), result, "chunk table", progress
        )
        layers.append(media.descriptor(layer.media_type, layer.digest, layer.size, blob_id))
        layers.append(media.descriptor(media.CHUNKS, table_layer.digest, table_layer.size, blob_id))
        entries.append(media.BlobEntry(key, blob_id, blob.size, layer.digest, table_layer.digest))
    config = media.ImageConfig(image.name, entries[0], tuple(entries[1:])).to_json()
    config_layer = _Layer("sha256:" + hashlib.sha256(config).hexdigest(), len(config), media.CONFIG)
    await _ensure(client, ref, config_layer, _reader(config), result, "config", progress)
    manifest = media.manifest(config_layer.digest, config_layer.size, layers)
    result.manifest_digest = await put_manifest(client, ref, manifest, media.MANIFEST)
    log.info(
        "image_pushed",
        name=name,
        reference=str(ref),
        digest=result.manifest_digest,
        layers=result.layers,
        uploaded=result.uploaded,
        len=result.bytes_uploaded,
    )
    return result


def _reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, size: data[offset : offset + size]


def human_size(n: int) -> str:
    """A size for people: 512 B, 12.0 KiB, 3.4 MiB, 1.2 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:  # noqa: PLR2004
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
