# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d add`: register a registry image in the LocalStore without its data.

Downloads the manifest, the config blob, every chunk table and the bootstrap
layer (always read whole at mount; spooled to an unlinked file, then cut
into chunks one at a time), and nothing else. Data blobs
are written as Blob records whose chunks carry `remote` ranges into their
registry layer, and each gets a Location record (registry, repository, this
image's layer ranges) that the Image record names in ``extra["locations"]``:
the daemon fetches this image's blobs from there only, whichever image added
the same blob first (store/locations.py). Everything goes into the
store in one transaction, the Image record last, so a running daemon sees the
image whole on its next OPEN or not at all.

Nothing the registry sends is trusted: every blob id must be the content id of
its chunk table (so an image cannot claim another blob's id), a blob record
already in the store is never replaced (its location is the first adder's and
no other image fetches through it), chunks above the store's size cap are
refused, and no file extents are taken over (dedup only uses what the local
builder hashed itself). An image declaring more than the `ImageBudget` (bootstrap
size, total size) is refused from its config blob, before a table or layer is read.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import structlog

from ondemand_d.errors import ImageError, StoreError
from ondemand_d.registry import media
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.reference import Reference
from ondemand_d.registry.source import decode
from ondemand_d.store.local import LocalStore
from ondemand_d.store.limits import DEFAULT_MAX_CHUNK, ImageBudget, check_chunks
from ondemand_d.store.locations import LOCATIONS
from ondemand_d.store.model import Blob, Chunk, Image, Location, check_name

log = structlog.get_logger()
MAX_CONFIG = 4 << 20
MAX_TABLE = 64 << 20


@dataclass(frozen=True, slots=True)
class AddResult:
    name: str
    manifest_digest: str
    blobs: int
    bytes_downloaded: int
    bytes_remote: int  # data left in the registry, fetched on demand


def default_name(ref: Reference) -> str:
    """'127.0.0.1:5000/apps/web:v1' -> 'apps_web:v1' (a valid image name and fsid)."""
    suffix = f":{ref.tag}" if ref.tag else f"@{ref.digest[7:19]}" if ref.digest else ""
    return check_name(ref.repository.replace("/", "_")[: 128 - len(suffix)] + suffix)


async def _table(
    client: RegistryClient, ref: Reference, entry: media.BlobEntry
) -> media.ChunkTable:
    table = media.ChunkTable.from_json(
        await client.get_blob(ref.registry, ref.repository, entry.table, MAX_TABLE)
    )
    if table.blob_id != entry.blob_id or table.size != entry.size:
        msg = (
            f"chunk table {entry.table} describes blob {table.blob_id}, config says {entry.blob_id}"
        )
        raise ImageError(msg)
    return table


def _blob(table: media.ChunkTable, layer: str, extra: dict[str, object], max_chunk: int) -> Blob:
    """The store record for a registry chunk table, or ImageError if it is not sound."""
    try:
        blob = table.to_blob(layer, extra)
        check_chunks(blob, max_chunk)
    except StoreError as exc:
        msg = f"the registry's chunk table for blob {table.blob_id[:16]} is refused: {exc}"
        raise ImageError(msg) from None
    return blob


def _layer_cap(max_bootstrap: int, chunks: int) -> int:
    """Largest bootstrap layer downloaded: zstd can make incompressible bytes a little
    longer (about 1/64), plus a frame header per chunk."""
    return max_bootstrap + (max_bootstrap >> 4) + 64 * chunks + 4096


async def add(
    store: LocalStore,
    ref: Reference,
    client: RegistryClient,
    *,
    name: str | None = None,
    replace: bool = False,
    max_chunk: int = DEFAULT_MAX_CHUNK,
    budget: ImageBudget = ImageBudget(),  # noqa: B008 - frozen, so one shared default is safe
) -> AddResult:
    """Register `ref` in `store` as image `name` (default: from the reference).

    Raises:
        FetchError / DigestMismatch: the registry failed or sent wrong bytes.
        ImageError: not an ondemand-d image, its records are inconsistent, or it declares
            more than `budget` allows (checked before any table or layer is downloaded).
        StoreError: the name is taken (without `replace`) or invalid.
    """
    name = check_name(name) if name else default_name(ref)
    before = client.bytes_received
    raw_manifest, manifest_digest = await client.get_manifest(ref, media.MANIFEST)
    config_digest, _ = media.config_descriptor(raw_manifest)
    config = media.ImageConfig.from_json(
        await client.get_blob(ref.registry, ref.repository, config_digest, MAX_CONFIG)
    )
    # Sizes as the config declares them, before any table or layer is downloaded: each
    # table must then say the same (_table), each Blob's chunks add up to its size, and each
    # chunk decodes to at most its length, so nothing is decoded past what passed here.
    budget.check(str(ref), config.bootstrap.size,
                 config.bootstrap.size + sum(e.size for e in config.devices))
    where = {"remote": {"registry": ref.registry, "repository": ref.repository}}

    boot_table = await _table(client, ref, config.bootstrap)
    boot_remote = _blob(boot_table, config.bootstrap.data, where, max_chunk)
    # The bootstrap layer is spooled to an unlinked file under the store and cut
    # into chunks one at a time: memory stays at one chunk whatever the layer's size.
    with tempfile.TemporaryFile(dir=store.root / "tmp") as spool:
        spooled = await client.get_blob_to(
            ref.registry, ref.repository, config.bootstrap.data,
            _layer_cap(budget.max_bootstrap, len(boot_table.chunks)), spool
        )
        # The bootstrap becomes an ordinary local blob: the kernel reads it whole at mount.
        # Its chunks are verified by decode(), and its id commits to them.
        bootstrap = Blob(
            boot_table.blob_id,
            boot_table.size,
            tuple(Chunk(c.offset, c.length, c.digest) for c in boot_remote.chunks),
        )
        devices = [
            (_blob(await _table(client, ref, e), e.data, where, max_chunk), e.key)
            for e in config.devices
        ]
        locations = {b.blob_id: Location.of(b) for b, _ in devices}
        try:
            image = Image(
                name,
                bootstrap.blob_id,
                tuple((key or blob.blob_id, blob.blob_id) for blob, key in devices),
                {"remote": {"reference": str(ref), "manifest": manifest_digest},
                 LOCATIONS: {b: loc.location_id for b, loc in locations.items() if loc}},
            )
        except StoreError as exc:
            raise ImageError(f"{ref} is refused: {exc}") from None
        with store.transaction():
            for chunk in boot_remote.chunks:
                assert chunk.remote is not None  # noqa: S101 - to_blob sets it on every chunk
                if chunk.remote.offset + chunk.remote.length > spooled:
                    msg = (f"{ref} is refused: its bootstrap's chunk table reaches past the "
                           f"layer's {spooled} bytes")
                    raise ImageError(msg)
                spool.seek(chunk.remote.offset)
                packed = spool.read(chunk.remote.length)
                store.put_chunk(decode(boot_remote, chunk, packed), chunk.digest)
            for blob in (bootstrap, *(b for b, _ in devices)):
                store.put_blob(blob)  # a record already there is kept: same id, same bytes
            for location in locations.values():
                if location is not None:
                    store.put_location(location)  # this image's own, whoever added the blob
            store.put_image(image, replace=replace)
    result = AddResult(
        name,
        manifest_digest,
        1 + len(devices),
        client.bytes_received - before,
        sum(b.size for b, _ in devices),
    )
    log.info(
        "image_added",
        name=name,
        reference=str(ref),
        digest=manifest_digest,
        blobs=result.blobs,
        downloaded=result.bytes_downloaded,
        remote=result.bytes_remote,
    )
    return result
