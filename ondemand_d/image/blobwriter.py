# SPDX-License-Identifier: Apache-2.0
"""Stream bytes into the store as one blob: 4 KiB aligned pieces, fixed-size store chunks.

Store chunks are the unit the daemon fetches, verifies and fills: a kernel
READ is answered with the whole store chunks around it, and a lazily pulled
image is fetched from its registry in store chunks. They are cut at fixed
boundaries of the blob, whatever the EROFS chunk sizes are, at the build's
base chunk size (`store_chunk_for`): `--chunk-size 64K` means 64 KiB fetch
units, so a start-up that reads a few KiB of many files fetches little more
than it reads. Larger base sizes are capped at 1 MiB: a 64 MiB EROFS chunk
becomes 64 store chunks, and no READ waits for more than 1 MiB. Smaller ones
are raised to 64 KiB: with 4 KiB store chunks a Python start-up from a
registry (bench/bench_startup.py) put 17% fewer bytes on the wire than with
64 KiB ones, but `add` downloaded 8.5x the chunk tables (9.8 MB for a 249 MB
tree), and the start-up took 5.5x the Range GETs and 4.6x the time.
"""
from __future__ import annotations

from typing import Any

from ondemand_d.image.format import BLOCK, align
from ondemand_d.store import Blob, Chunk, LocalStore

#: The largest store chunk (and the bootstrap's store chunk size).
STORE_CHUNK = 1 << 20
#: The smallest store chunk a build cuts (see the module docstring).
MIN_STORE_CHUNK = 64 << 10


def store_chunk_for(base_chunk: int) -> int:
    """The store chunk size of a build whose base chunk size is `base_chunk`."""
    return min(max(base_chunk, MIN_STORE_CHUNK), STORE_CHUNK)


class BlobWriter:
    """Append block-aligned pieces; `finish()` records the blob and its chunk table."""

    def __init__(self, store: LocalStore, store_chunk: int = STORE_CHUNK) -> None:
        if store_chunk <= 0 or store_chunk % BLOCK:
            msg = f"store chunk size {store_chunk} is not a multiple of {BLOCK}"
            raise ValueError(msg)
        self._store = store
        self._store_chunk = store_chunk
        self._buf = bytearray()
        self._flushed = 0
        self._chunks: list[Chunk] = []
        self.extents: list[list[Any]] = []

    @property
    def size(self) -> int:
        """Bytes appended so far (always a multiple of 4 KiB between pieces)."""
        return self._flushed + len(self._buf)

    def append(self, data: bytes, *, pad: bool = True) -> int:
        """Append `data`, zero-padded to 4 KiB when `pad`; return its blob offset.

        Unpadded appends let one EROFS chunk be written in parts; the caller
        must end such a run with a padded append (or a multiple of 4 KiB).
        """
        offset = self.size
        self._buf += data
        if pad:
            self._buf += bytes(align(len(self._buf), BLOCK) - len(self._buf))
        while len(self._buf) >= self._store_chunk:
            self._flush(self._store_chunk)
        return offset

    def record(self, digest: str, offset: int, length: int) -> None:
        """Note an extent for the chunk dictionary (see dedup.py)."""
        self.extents.append([digest, offset, length])

    def finish(self, extra: dict[str, Any] | None = None) -> Blob | None:
        """Write the last store chunk and the blob record; None if nothing was appended."""
        if self._buf:
            self._flush(len(self._buf))
        if not self._chunks:
            return None
        blob = Blob.of(tuple(self._chunks), extra)  # its id commits to the chunk table
        self._store.put_blob(blob)
        return blob

    def _flush(self, length: int) -> None:
        data = bytes(self._buf[:length])
        del self._buf[:length]
        digest = self._store.put_chunk(data)
        self._chunks.append(Chunk(self._flushed, length, digest))
        self._flushed += length


def put_bytes(store: LocalStore, data: bytes, extra: dict[str, Any] | None = None) -> Blob:
    """Store a whole in-memory blob (the bootstrap) the same way."""
    writer = BlobWriter(store)
    writer.append(data, pad=False)
    blob = writer.finish(extra)
    if blob is None:
        msg = "an empty blob cannot be stored"
        raise ValueError(msg)
    return blob
