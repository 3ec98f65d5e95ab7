# SPDX-License-Identifier: Apache-2.0
"""How an ondemand-d image is laid out in an OCI registry (no I/O).

An image is one OCI image manifest (``application/vnd.oci.image.manifest.v1+json``,
schemaVersion 2). Every blob of the image (the bootstrap first, then each data
device in slot order) contributes two layers, in this order:

``application/vnd.ondemand-d.blob.v1+zstd``
    The blob's bytes, each chunk compressed on its own as one zstd frame and the
    frames concatenated. Any chunk can be fetched with one Range GET and
    decompressed alone, and the whole layer is still a valid zstd stream that
    ``zstd -d`` turns back into the blob byte for byte.
``application/vnd.ondemand-d.blob.v1``
    The same, uncompressed (``push --no-compress``): the layer *is* the blob,
    so its registry digest is ``sha256:<blob id>``.
``application/vnd.ondemand-d.chunks.v1+json``
    The blob's chunk table (see `ChunkTable`): for each chunk its offset and
    length in the uncompressed blob, its sha256, and where its bytes sit in the
    data layer. `add` downloads these, never the data.

The config blob, ``application/vnd.ondemand-d.image.config.v1+json``, ties them
together (see `ImageConfig`): the image name it was pushed from and, per blob,
its blob id, size, device key, and the digests of its data and table layers.
A registry that does not know these media types stores them like any other;
clients that do not know them leave them alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ondemand_d.errors import ImageError
from ondemand_d.store.model import Blob, Chunk, RemoteRange, check_digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.ondemand-d.image.config.v1+json"
BLOB = "application/vnd.ondemand-d.blob.v1"
BLOB_ZSTD = "application/vnd.ondemand-d.blob.v1+zstd"
CHUNKS = "application/vnd.ondemand-d.chunks.v1+json"
#: Annotation on each layer naming the blob id it carries (for people and tools).
BLOB_ID_ANNOTATION = "dev.ondemand-d.blob-id"

SCHEMA = 1


def dumps(obj: Any) -> bytes:
    """Canonical JSON: the same object always gives the same bytes, so the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def loads(data: bytes, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except ValueError as exc:
        msg = f"{what} is not JSON: {exc}"
        raise ImageError(msg) from None
    if not isinstance(raw, dict):
        msg = f"{what} is not a JSON object"
        raise ImageError(msg)
    return raw


def descriptor(
    media_type: str, digest: str, size: int, blob_id: str | None = None
) -> dict[str, Any]:
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if blob_id is not None:
        desc["annotations"] = {BLOB_ID_ANNOTATION: blob_id}
    return desc


@dataclass(frozen=True, slots=True)
class ChunkTable:
    """A blob's chunks and where each one sits in its data layer.

    JSON: ``{"schema": 1, "blob_id": hex, "size": n, "compression": "zstd"|"none",
    "chunks": [[offset, length, sha256hex, layer_offset, layer_length], ...],
    "extra": {...}}``. `extra` carries the Blob's extra fields (e.g. the
    builder's fields); `add` ignores it: only the table itself reaches the store.
    """

    blob_id: str
    size: int
    compression: str
    chunks: tuple[tuple[Chunk, int, int], ...]  # (chunk, layer offset, layer length)
    extra: dict[str, Any]

    def to_json(self) -> bytes:
        rows = [[c.offset, c.length, c.digest, off, n] for c, off, n in self.chunks]
        return dumps(
            {
                "schema": SCHEMA,
                "blob_id": self.blob_id,
                "size": self.size,
                "compression": self.compression,
                "chunks": rows,
                "extra": self.extra,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> ChunkTable:
        raw = loads(data, "chunk table")
        try:
            if raw.get("schema") != SCHEMA:
                msg = f"chunk table schema {raw.get('schema')!r} is not {SCHEMA}"
                raise ImageError(msg)
            compression = str(raw["compression"])
            if compression not in ("zstd", "none"):
                msg = f"chunk table compression {compression!r} is unknown"
                raise ImageError(msg)
            rows = tuple(
                (Chunk(int(r[0]), int(r[1]), check_digest(str(r[2]))), int(r[3]), int(r[4]))
                for r in raw["chunks"]
            )
            extra = raw.get("extra") or {}
            return cls(
                check_digest(str(raw["blob_id"])), int(raw["size"]), compression, rows, dict(extra)
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            msg = f"chunk table is malformed: {exc!r}"
            raise ImageError(msg) from None

    def to_blob(self, layer_digest: str, extra: dict[str, Any]) -> Blob:
        """The Blob record whose chunks point into the registry layer `layer_digest`.

        The table's own `extra` is not carried over: nothing a registry declares
        beyond the chunk table itself reaches the store.

        Raises:
            StoreError: the table does not describe a valid blob (gaps, misaligned,
                or `blob_id` is not the content id of the table).
        """
        chunks = tuple(
            Chunk(c.offset, c.length, c.digest, RemoteRange(layer_digest, off, n, self.compression))
            for c, off, n in self.chunks
        )
        return Blob(self.blob_id, self.size, chunks, dict(extra))


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """One blob of an image as the config blob lists it."""

    key: str  # device cookie key; "" for the bootstrap
    blob_id: str
    size: int
    data: str  # data layer digest
    table: str  # chunk table layer digest


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The config blob: ``{"schema": 1, "name": ..., "bootstrap": entry, "devices": [entry]}``.

    An entry is ``{"key", "blob_id", "size", "data", "table"}`` (see `BlobEntry`).
    """

    name: str
    bootstrap: BlobEntry
    devices: tuple[BlobEntry, ...]

    def to_json(self) -> bytes:
        def entry(e: BlobEntry) -> dict[str, Any]:
            return {
                "key": e.key,
                "blob_id": e.blob_id,
                "size": e.size,
                "data": e.data,
                "table": e.table,
            }

        return dumps(
            {
                "schema": SCHEMA,
                "name": self.name,
                "bootstrap": entry(self.bootstrap),
                "devices": [entry(d) for d in self.devices],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> ImageConfig:
        raw = loads(data, "image config")

        def entry(e: dict[str, Any]) -> BlobEntry:
            return BlobEntry(
                str(e["key"]),
                check_digest(str(e["blob_id"])),
                int(e["size"]),
                _layer_digest(e["data"]),
                _layer_digest(e["table"]),
            )

        try:
            if raw.get("schema") != SCHEMA:
                msg = f"image config schema {raw.get('schema')!r} is not {SCHEMA}"
                raise ImageError(msg)
            return cls(
                str(raw["name"]),
                entry(raw["bootstrap"]),
                tuple(entry(d) for d in raw["devices"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"image config is malformed: {exc!r}"
            raise ImageError(msg) from None


def _layer_digest(value: Any) -> str:
    text = str(value)
    if not text.startswith("sha256:"):
        msg = f"layer digest {text!r} is not sha256:<hex>"
        raise ValueError(msg)
    check_digest(text[7:])
    return text


def manifest(config_digest: str, config_size: int, layers: list[dict[str, Any]]) -> bytes:
    return dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": descriptor(CONFIG, config_digest, config_size),
            "layers": layers,
        }
    )


def config_descriptor(raw_manifest: bytes) -> tuple[str, int]:
    """The (digest, size) of an ondemand-d manifest's config blob.

    Raises:
        ImageError: not an OCI manifest, or not an ondemand-d image.
    """
    raw = loads(raw_manifest, "manifest")
    try:
        if raw.get("schemaVersion") != 2 or raw.get("mediaType", MANIFEST) != MANIFEST:  # noqa: PLR2004
            msg = f"not an OCI image manifest (mediaType {raw.get('mediaType')!r})"
            raise ImageError(msg)
        config = raw["config"]
        if config.get("mediaType") != CONFIG:
            msg = f"not an ondemand-d image: config media type is {config.get('mediaType')!r}"
            raise ImageError(msg)
        return _layer_digest(config["digest"]), int(config["size"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        msg = f"manifest is malformed: {exc!r}"
        raise ImageError(msg) from None
