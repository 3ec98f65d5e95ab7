# SPDX-License-Identifier: Apache-2.0
"""Per-file chunk placement: choose each file's chunk size, dedup, write new data.

Policy (issue 4, after the EROFS page-cache-sharing design): a mapping must
not span two blobs if a file is to share page cache, so

* a file the dictionary already holds whole is one chunk pointing there;
* a file up to the base chunk size is one chunk;
* a larger file whose pieces (base-size slices) are partly known elsewhere,
  or that has holes, is split at the base chunk size, each piece reused,
  left unmapped or written;
* any other larger file cannot be deduplicated now, so it is one chunk (one
  blob) of the next power of two >= its size, capped at the format maximum.

Whatever the chunk size, every base-size piece of new data is recorded in the
dictionary, so a later image can still reuse slices of a big single chunk.

All-zero pieces: only those with nothing but zeros after them in the file
become holes (unmapped indexes, no blob bytes). A zero piece followed by data
points at one real all-zero chunk instead, written once per base size and
deduplicated like any other: on the fscache path the kernel (5.19 to at least
6.12, `erofs_fscache_data_read_slice`) zero-fills the *whole rest of the read
request* when it meets an unmapped chunk, so data after a hole would read as
zeros. A trailing hole is safe: a request never extends past end of file.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from ondemand_d.errors import ImageError
from ondemand_d.image.blobwriter import BlobWriter
from ondemand_d.image.dedup import NEW_BLOB, ChunkDictionary, Extent
from ondemand_d.image.format import BLKSZBITS, BLOCK, MAX_CHUNKBITS
from ondemand_d.image.tree import Content

DEFAULT_BASE_CHUNK = 1 << 20
#: Zero chunks are hashed and written in slices of this size (a base chunk may be huge).
_ZERO_SLICE = 1 << 20


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one EROFS chunk's bytes are: a blob (NEW_BLOB = this build's) and offset."""

    blob_id: str
    offset: int


@dataclass(frozen=True, slots=True)
class FileChunks:
    """A regular file's chunk map. `refs[k]` is None for a hole."""

    chunkbits: int
    refs: tuple[ChunkRef | None, ...]
    sha256: bytes  # of the whole file, for fingerprints; b"" if not asked for and sparse


@dataclass(slots=True)
class ChunkStats:
    total: int = 0
    new: int = 0
    reused: int = 0
    holes: int = 0
    zero_chunks: int = 0  # indexes pointing at a real all-zero chunk
    bytes_new: int = 0
    bytes_saved: int = 0


def chunkbits_for(size: int) -> int:
    """The smallest allowed chunk size (as bits) holding `size` bytes in one chunk."""
    return min(max(BLKSZBITS, (size - 1).bit_length()), MAX_CHUNKBITS)


def check_base_chunk(size: int) -> int:
    if size < BLOCK or size & (size - 1) or size > 1 << MAX_CHUNKBITS:
        msg = f"chunk size {size} must be a power of two from {BLOCK} to 2^{MAX_CHUNKBITS}"
        raise ValueError(msg)
    return size


class ChunkPlanner:
    """Places the files of one build; owns the dictionary and the new blob's writer."""

    def __init__(
        self,
        dictionary: ChunkDictionary,
        writer: BlobWriter,
        base_chunk: int = DEFAULT_BASE_CHUNK,
        on_bytes: Callable[[int], None] | None = None,
        *,
        whole_digests: bool = False,
    ) -> None:
        self.dictionary = dictionary
        self.writer = writer
        self.base = check_base_chunk(base_chunk)
        # A sparse file's whole digest is only worth hashing its zeros for fingerprints.
        self.whole_digests = whole_digests
        self.stats = ChunkStats()
        self._on_bytes = on_bytes or (lambda _n: None)
        self._zero_digests: dict[int, str] = {}

    def place(self, content: Content) -> FileChunks:
        """Decide and write the chunks of one non-empty file."""
        size = content.size
        if size <= self.base:
            data = content.read(0, size)  # one read; zeros are found below anyway
            digest = hashlib.sha256(data).digest()
            ref = self._place_piece(data, digest.hex())
            self._on_bytes(size)
            return FileChunks(chunkbits_for(size), (ref,), digest)
        pieces, whole, any_known, any_hole = self._survey(content)
        known = self.dictionary.lookup(whole.hex(), size) if whole else None
        if known is not None:
            return FileChunks(chunkbits_for(size), (self._reuse(known, size),), whole)
        if any_known or any_hole or chunkbits_for(size) == MAX_CHUNKBITS:
            last_data = max((i for i, d in enumerate(pieces) if d is not None), default=-1)
            refs = tuple(
                self._place_split(content, i, d, trailing=i > last_data)
                for i, d in enumerate(pieces)
            )
            return FileChunks(self.base.bit_length() - 1, refs, whole)
        ref = self._write_whole(content, pieces, whole.hex())
        return FileChunks(chunkbits_for(size), (ref,), whole)

    # -- the shapes -------------------------------------------------------------

    def _place_piece(self, data: bytes, digest: str) -> ChunkRef | None:
        """A file's only chunk, bytes in hand: hole (all zero, so trailing), reuse or write."""
        if not any(data):
            self._count_hole()
            return None
        known = self.dictionary.lookup(digest, len(data))
        if known is not None:
            return self._reuse(known, len(data))
        return self._write_new(data, digest)

    def _place_split(
        self, content: Content, index: int, digest: str | None, *, trailing: bool
    ) -> ChunkRef | None:
        start = index * self.base
        length = min(self.base, content.size - start)
        if digest is None and trailing:  # zeros up to end of file: a hole is safe
            self._count_hole()
            return None
        if digest is None:  # zeros with data after them: never a hole (module docstring)
            return self._zero_chunk(length)
        known = self.dictionary.lookup(digest, length)
        if known is not None:
            return self._reuse(known, length)
        return self._write_new(self._reread(content, start, length, digest), digest)

    def _write_new(self, data: bytes, digest: str) -> ChunkRef:
        self._count_new(len(data))
        offset = self.writer.append(data)
        self._record(digest, offset, len(data))
        return ChunkRef(NEW_BLOB, offset)

    def _zero_chunk(self, length: int) -> ChunkRef:
        """The all-zero chunk of `length` bytes (only base-size ones are asked for).

        Found in the dictionary like any chunk (this build's or an earlier
        one's); written once, in slices, if it is new.
        """
        self.stats.zero_chunks += 1
        digest = self._zero_digest(length)
        known = self.dictionary.lookup(digest, length)
        if known is not None:
            return self._reuse(known, length)
        self._count_new(length)
        offset = self.writer.size
        for start in range(0, length, _ZERO_SLICE):
            self.writer.append(bytes(min(_ZERO_SLICE, length - start)), pad=False)
        self.writer.append(b"")  # pad to 4 KiB (a no-op for whole blocks)
        self._record(digest, offset, length)
        return ChunkRef(NEW_BLOB, offset)

    def _zero_digest(self, length: int) -> str:
        digest = self._zero_digests.get(length)
        if digest is None:
            h = hashlib.sha256()
            for start in range(0, length, _ZERO_SLICE):
                h.update(bytes(min(_ZERO_SLICE, length - start)))
            digest = self._zero_digests[length] = h.hexdigest()
        return digest

    def _write_whole(self, content: Content, pieces: list[str | None], whole: str) -> ChunkRef:
        """One chunk for the whole file; its pieces stay findable in the dictionary."""
        self._count_new(content.size)
        start = self.writer.size
        for i, digest in enumerate(pieces):
            assert digest is not None  # files with holes are split, never written whole
            length = min(self.base, content.size - i * self.base)
            data = self._reread(content, i * self.base, length, digest)
            offset = self.writer.append(data, pad=i == len(pieces) - 1)
            self._record(digest, offset, length)
        self._record(whole, start, content.size)
        return ChunkRef(NEW_BLOB, start)

    @staticmethod
    def _reread(content: Content, start: int, length: int, digest: str) -> bytes:
        """Read a piece again and insist it is what the survey hashed.

        A digest recorded for bytes that were not written would poison the
        dictionary for every later build, so a file that changes under us fails.
        """
        data = content.read(start, length)
        if hashlib.sha256(data).hexdigest() != digest:
            label = getattr(content, "path", None) or getattr(content, "label", "a file")
            msg = f"{label} changed while the image was built; build again"
            raise ImageError(msg)
        return data

    # -- helpers -------------------------------------------------------------

    def _survey(self, content: Content) -> tuple[list[str | None], bytes, bool, bool]:
        """Hash every base-size piece (None = all zero) and, if needed, the whole file."""
        whole: hashlib._Hash | None = hashlib.sha256()
        pieces: list[str | None] = []
        any_known = any_hole = False
        for start in range(0, content.size, self.base):
            length = min(self.base, content.size - start)
            data = content.read(start, length) if content.has_data(start, length) else b""
            if not data or not any(data):
                pieces.append(None)
                any_hole = True
                if whole is not None and not self.whole_digests:
                    whole = None  # split around holes anyway, never looked up whole
                elif whole is not None:
                    whole.update(data or bytes(length))
            else:
                if whole is not None:
                    whole.update(data)
                digest = hashlib.sha256(data).hexdigest()
                pieces.append(digest)
                any_known = any_known or self.dictionary.lookup(digest, length) is not None
            self._on_bytes(length)
        return pieces, whole.digest() if whole is not None else b"", any_known, any_hole

    def _record(self, digest: str, offset: int, length: int) -> None:
        self.writer.record(digest, offset, length)
        self.dictionary.add(digest, Extent(NEW_BLOB, offset, length))

    def _count_hole(self) -> None:
        self.stats.total += 1
        self.stats.holes += 1

    def _reuse(self, extent: Extent, length: int) -> ChunkRef:
        self.stats.total += 1
        self.stats.reused += 1
        self.stats.bytes_saved += length
        return ChunkRef(extent.blob_id, extent.offset)

    def _count_new(self, length: int) -> None:
        self.stats.total += 1
        self.stats.new += 1
        self.stats.bytes_new += length
