# SPDX-License-Identifier: Apache-2.0
"""The per-file chunk policy, the dedup dictionary and the blob writer's store invariants."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ondemand_d.image.blobwriter import STORE_CHUNK, BlobWriter
from ondemand_d.image.chunking import ChunkPlanner, ChunkRef, chunkbits_for
from ondemand_d.image.dedup import NEW_BLOB, ChunkDictionary, Extent
from ondemand_d.image.format import MAX_CHUNKBITS
from ondemand_d.image.tree import BytesContent
from ondemand_d.store import LocalStore
from ondemand_d.store.model import content_id

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _planner(store: LocalStore, dictionary: ChunkDictionary | None = None) -> ChunkPlanner:
    return ChunkPlanner(dictionary or ChunkDictionary(), BlobWriter(store), 1 * MiB)


def test_chunkbits_for() -> None:
    """One chunk holds the file: the next power of two, at least a block, at most 2^43."""
    assert chunkbits_for(1) == 12 and chunkbits_for(4096) == 12 and chunkbits_for(4097) == 13
    assert chunkbits_for(5 * MiB) == 23
    assert chunkbits_for(1 << 50) == MAX_CHUNKBITS


def test_small_file_is_one_chunk_and_dedups_within_the_build(store: LocalStore) -> None:
    """A small file is one chunk; the same bytes again reuse it."""
    p = _planner(store)
    a = p.place(BytesContent(b"x" * 10000))
    b = p.place(BytesContent(b"x" * 10000))
    assert a.refs == b.refs == (ChunkRef(NEW_BLOB, 0),) and a.chunkbits == 14
    assert (p.stats.new, p.stats.reused, p.stats.bytes_saved) == (1, 1, 10000)
    assert a.sha256 == hashlib.sha256(b"x" * 10000).digest()


def test_zero_file_is_a_hole(store: LocalStore) -> None:
    """All-zero data is never written: the chunk index stays unmapped."""
    p = _planner(store)
    assert p.place(BytesContent(bytes(50000))).refs == (None,)
    assert p.stats.holes == 1 and p.writer.size == 0


def test_new_large_file_is_one_chunk_with_findable_pieces(store: LocalStore) -> None:
    """A big file nobody shares is one chunk (one blob); its 1 MiB pieces go in the dictionary."""
    data = os.urandom(3 * MiB + 100)
    p = _planner(store)
    placed = p.place(BytesContent(data))
    assert placed.chunkbits == 22 and placed.refs == (ChunkRef(NEW_BLOB, 0),)
    piece = hashlib.sha256(data[MiB : 2 * MiB]).hexdigest()
    assert p.dictionary.lookup(piece, MiB) == Extent(NEW_BLOB, MiB, MiB)
    assert p.dictionary.lookup(hashlib.sha256(data).hexdigest(), len(data)) == Extent(
        NEW_BLOB, 0, len(data)
    )


def test_shareable_large_file_is_split_and_reuses_pieces(store: LocalStore) -> None:
    """A big file with a piece known elsewhere splits at the base size and reuses that piece."""
    data = os.urandom(3 * MiB)
    known = ChunkDictionary()
    known.add(hashlib.sha256(data[MiB : 2 * MiB]).hexdigest(), Extent("b" * 64, 8 * MiB, MiB))
    p = _planner(store, known)
    placed = p.place(BytesContent(data))
    assert placed.chunkbits == 20
    assert placed.refs == (
        ChunkRef(NEW_BLOB, 0),
        ChunkRef("b" * 64, 8 * MiB),
        ChunkRef(NEW_BLOB, MiB),
    )
    assert (p.stats.new, p.stats.reused, p.stats.bytes_new) == (2, 1, 2 * MiB)


def test_zero_pieces_before_data_share_one_zero_chunk(store: LocalStore) -> None:
    """Zero pieces with data after them point at one written zero chunk, never a hole.

    (The fscache read path zero-fills the rest of a request at an unmapped chunk.)
    """
    data = b"a" * 100 + bytes(4 * MiB) + b"z"
    p = _planner(store)
    placed = p.place(BytesContent(data))
    assert placed.chunkbits == 20 and len(placed.refs) == 5
    zero = ChunkRef(NEW_BLOB, MiB)  # written right after the first data piece
    assert placed.refs[1:4] == (zero, zero, zero) and None not in placed.refs
    assert (p.stats.zero_chunks, p.stats.holes) == (3, 0)
    # a full first data piece, the one zero chunk, a padded last piece
    assert p.writer.size == 2 * MiB + 4096


def test_trailing_zero_pieces_stay_holes(store: LocalStore) -> None:
    """Zeros up to end of file cost nothing: unmapped chunks, no blob bytes."""
    p = _planner(store)
    placed = p.place(BytesContent(b"a" * 100 + bytes(3 * MiB)))
    assert placed.refs[1:] == (None, None, None) and placed.refs[0] is not None
    assert (p.stats.zero_chunks, p.stats.holes) == (0, 3) and p.writer.size == MiB


def test_whole_file_known_is_one_reused_chunk(store: LocalStore) -> None:
    """A file the dictionary holds whole maps to that extent with one chunk."""
    data = os.urandom(2 * MiB + 1)
    known = ChunkDictionary()
    known.add(hashlib.sha256(data).hexdigest(), Extent("c" * 64, 0, len(data)))
    p = _planner(store, known)
    placed = p.place(BytesContent(data))
    assert placed.refs == (ChunkRef("c" * 64, 0),) and placed.chunkbits == 22
    assert p.writer.size == 0 and p.stats.bytes_saved == len(data)


def test_blob_store_chunks_are_aligned_and_at_most_1mib(store: LocalStore) -> None:
    """A 5 MiB EROFS chunk becomes 1 MiB store chunks; extents round-trip through the store."""
    p = _planner(store)
    p.place(BytesContent(os.urandom(5 * MiB + 7)))
    p.place(BytesContent(b"tail" * 10))
    blob = p.writer.finish()
    assert blob is not None and blob.size % 4096 == 0
    store.put_dedup(blob.blob_id, p.writer.extents)
    assert all(c.length <= STORE_CHUNK and c.offset % 4096 == 0 for c in blob.chunks)
    assert content_id(blob.size, blob.chunks) == blob.blob_id  # the id commits to the table
    again = ChunkDictionary.from_store(store)
    assert len(again) == len(p.writer.extents)
    assert again.lookup(hashlib.sha256(b"tail" * 10).hexdigest(), 40) == Extent(
        blob.blob_id,
        5 * MiB + 4096,
        40,  # after the first file, padded to 4 KiB
    )


def test_bad_base_chunk_size(store: LocalStore) -> None:
    """The base chunk size must be a power of two of at least one block."""
    for size in (0, 1000, 3 * 4096):
        with pytest.raises(ValueError, match="power of two"):
            ChunkPlanner(ChunkDictionary(), BlobWriter(store), size)


class _Shifting:
    """A file whose bytes change between the planner's survey and its write."""

    size = 3 * MiB

    def __init__(self) -> None:
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return bytes([1 + (self.reads > 3)]) * length  # the second pass sees new bytes

    def has_data(self, offset: int, length: int) -> bool:  # noqa: ARG002
        return True


def test_file_changing_during_the_build_is_refused(store: LocalStore) -> None:
    """A piece whose bytes differ from what was hashed never enters the dictionary."""
    from ondemand_d.errors import ImageError

    p = _planner(store)
    with pytest.raises(ImageError, match="changed while the image was built"):
        p.place(_Shifting())
    assert len(p.dictionary) == 0
