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
    """sha256 hex digest -> Extent, first writer wins."""

    def __init__(self) -> None:
        self._extents: dict[str, Extent] = {}

    @classmethod
    def from_store(cls, store: LocalStore) -> ChunkDictionary:
        """Collect the locally hashed extents of every blob in the store, in blob-id order."""
        self = cls()
        for blob_id, extents in store.dedup_records():
            for digest, offset, length in extents:
                self._extents.setdefault(str(digest), Extent(blob_id, int(offset), int(length)))
        return self

    def __len__(self) -> int:
        return len(self._extents)

    def lookup(self, digest: str, length: int) -> Extent | None:
        extent = self._extents.get(digest)
        return extent if extent is not None and extent.length == length else None

    def add(self, digest: str, extent: Extent) -> None:
        self._extents.setdefault(digest, extent)
