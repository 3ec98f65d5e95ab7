# SPDX-License-Identifier: Apache-2.0
"""The chunk dictionary: digest of an EROFS chunk -> where those bytes already are.

It is derived from the store's dedup index: for every data blob the local
builder wrote, the extents `[[sha256_hex, offset, length], ...]` it hashed
itself over the bytes it wrote (`LocalStore.put_dedup`). Nothing an imported
or added image declares is ever a dedup source, so a registry cannot make a
build "reuse" its bytes for content it guessed. The blob id commits to the
blob's chunks, so an extent stays true for as long as its blob exists, and an
index whose blob is gone is skipped.

An extent is always 4 KiB aligned in its blob and the bytes after `length` up
to the next 4 KiB boundary are zero, so any chunk index may point at it (the
kernel reads whole blocks, spec §5.3).
"""
from __future__ import annotations

from dataclasses import dataclass

from ondemand_d.errors import StoreError
from ondemand_d.store import LocalStore

#: Blob id placeholder for the data blob being written in this build.
NEW_BLOB = ""


@dataclass(frozen=True, slots=True)
class Extent:
    """`length` bytes at `offset` (4 KiB aligned) of blob `blob_id`."""

    blob_id: str
    offset: int
    length: int


class ChunkDictionary:
    """sha256 hex digest -> Extent, first writer wins.

    An extent in a stored blob is handed out only after that blob's store
    chunks were hashed in this build and found whole: a damaged or missing
    chunk is never reused.
    """

    def __init__(self, store: LocalStore | None = None) -> None:
        self._extents: dict[str, Extent] = {}
        self._store = store
        self._blob_ok: dict[str, bool] = {}  # blob id -> every chunk verified whole

    @classmethod
    def from_store(cls, store: LocalStore) -> ChunkDictionary:
        """Collect the locally hashed extents of every blob in the store, in blob-id order."""
        self = cls(store)
        for blob_id, extents in store.dedup_records():
            for digest, offset, length in extents:
                self._extents.setdefault(str(digest), Extent(blob_id, int(offset), int(length)))
        return self

    def __len__(self) -> int:
        return len(self._extents)

    def lookup(self, digest: str, length: int) -> Extent | None:
        extent = self._extents.get(digest)
        if extent is None or extent.length != length or not self._sound(extent):
            return None
        return extent

    def _sound(self, extent: Extent) -> bool:
        """Whether `extent`'s blob is whole: every store chunk present and hashing right.

        Checked for the whole blob at its first use (cached): a blob with any damaged
        chunk gives nothing, so rebuilding its content lays it out as before and the
        same store chunks are written again, which heals every image that uses it.
        """
        if extent.blob_id == NEW_BLOB or self._store is None:
            return True
        ok = self._blob_ok.get(extent.blob_id)
        if ok is None:
            try:
                chunks = self._store.get_blob(extent.blob_id).chunks
            except StoreError:
                chunks = ()
            ok = bool(chunks) and all(self._store.chunk_ok(c.digest, c.length) for c in chunks)
            self._blob_ok[extent.blob_id] = ok
        return ok

    def add(self, digest: str, extent: Extent) -> None:
        self._extents.setdefault(digest, extent)
