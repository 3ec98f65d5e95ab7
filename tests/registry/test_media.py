# SPDX-License-Identifier: Apache-2.0
"""Media types, chunk tables and the config blob: round trips and refusals."""

from __future__ import annotations

import hashlib

import pytest
import zstandard

from ondemand_d.errors import DigestMismatch, ImageError, StoreError
from ondemand_d.registry import media
from ondemand_d.registry.source import decode
from ondemand_d.store.model import Chunk, content_id

H = "0" * 64


def _table(compression: str = "zstd") -> media.ChunkTable:
    rows = ((Chunk(0, 4096, "a" * 64), 0, 100), (Chunk(4096, 10, "b" * 64), 100, 20))
    blob_id = content_id(4106, tuple(c for c, _, _ in rows))
    return media.ChunkTable(blob_id, 4106, compression, rows, {"extents": [["a" * 64, 0, 4096]]})


def test_chunk_table_round_trip_and_blob() -> None:
    """A table survives JSON, and to_blob() points every chunk into the data layer."""
    table = _table()
    assert media.ChunkTable.from_json(table.to_json()) == table
    blob = table.to_blob("sha256:" + H, {"remote": {"registry": "r", "repository": "x"}})
    # The table's own extra (say, dedup extents) never reaches the store.
    assert blob.extra == {"remote": {"registry": "r", "repository": "x"}}
    assert [c.remote.offset for c in blob.chunks if c.remote] == [0, 100]
    assert all(c.remote and c.remote.compression == "zstd" for c in blob.chunks)


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b"not json",
        b'{"schema": 2}',
        b'{"schema": 1, "blob_id": "x"}',
        b'{"schema":1,"blob_id":"' + b"c" * 64 + b'","size":1,"compression":"lz4","chunks":[]}',
    ],
)
def test_chunk_table_refusals(raw: bytes) -> None:
    """Malformed tables are ImageError, never a KeyError or a half-built record."""
    with pytest.raises(ImageError):
        media.ChunkTable.from_json(raw)


def test_table_with_gap_is_refused_as_a_blob() -> None:
    """A table whose chunks leave a gap fails when made a Blob (the store's own check)."""
    rows = ((Chunk(0, 4096, "a" * 64), 0, 100), (Chunk(8192, 10, "b" * 64), 100, 20))
    with pytest.raises(StoreError):
        media.ChunkTable("c" * 64, 8202, "zstd", rows, {}).to_blob("sha256:" + H, {})


def test_table_claiming_another_blob_id_is_refused() -> None:
    """A blob id is the content id of its table: a registry cannot claim another blob's id."""
    rows = ((Chunk(0, 4096, "a" * 64), 0, 100),)
    with pytest.raises(StoreError, match="does not match its chunk table"):
        media.ChunkTable("c" * 64, 4096, "zstd", rows, {}).to_blob("sha256:" + H, {})


def test_manifest_and_config() -> None:
    """A pushed manifest names our config type; another config type is refused."""
    entry = media.BlobEntry("", "c" * 64, 4106, "sha256:" + H, "sha256:" + "1" * 64)
    config = media.ImageConfig(
        "img", entry, (media.BlobEntry("k", "d" * 64, 1, entry.data, entry.table),)
    )
    assert media.ImageConfig.from_json(config.to_json()) == config
    raw = media.manifest("sha256:" + H, 10, [])
    assert media.config_descriptor(raw) == ("sha256:" + H, 10)
    with pytest.raises(ImageError, match="not an ondemand-d image"):
        media.config_descriptor(raw.replace(media.CONFIG.encode(), b"application/x"))
    with pytest.raises(ImageError):
        media.config_descriptor(b'{"schemaVersion": 1}')


def test_decode_checks_frames() -> None:
    """decode() accepts the right frame, refuses a lying content size and garbage."""
    data = b"hello world" * 400
    chunk = Chunk(0, len(data), hashlib.sha256(data).hexdigest())
    table = media.ChunkTable(content_id(len(data), (chunk,)), len(data), "zstd", ((chunk, 0, 1),), {})
    blob = table.to_blob("sha256:" + H, {})
    frame = zstandard.ZstdCompressor().compress(data)
    assert decode(blob, blob.chunks[0], frame) == data
    with pytest.raises(DigestMismatch, match="offset 0"):
        decode(blob, blob.chunks[0], zstandard.ZstdCompressor().compress(data + b"!"))
    with pytest.raises(DigestMismatch):
        decode(blob, blob.chunks[0], b"\x00" * 20)
    with pytest.raises(DigestMismatch):
        decode(blob, blob.chunks[0], zstandard.ZstdCompressor().compress(data[:-1] + b"?"))
