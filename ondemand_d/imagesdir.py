# SPDX-License-Identifier: Apache-2.0
"""`serve --images DIR`: plain EROFS image files, named by cookie key, served as they are.

For people debugging a kernel or an image format: a fresh `mkfs.erofs` output in DIR
is mountable at once (`mount -t erofs none -o fsid=<file name> /mnt`, a `--blobdev` blob
by `device=<file name>`), as the kernel authors' reference daemon does. Nothing is
imported and **nothing is verified**: the bytes are whatever the file holds when the
kernel asks (the daemon says so in its log at start-up).

`ImagesDir` offers what the service and the control views use of a `LocalStore`:
keys resolve to blobs cut into chunks, and chunks read straight from the file.

Each OPEN sees one *version* of a file (device, inode, size, mtime): its blob, and every
chunk read for it, belong to that version only. A file rewritten or replaced after the
OPEN fails the READs of that object (EIO, "changed since it was opened") instead of
handing the kernel bytes of two versions. A version's chunk table is arithmetic, not a
list: OPEN and `status` cost the same for a 1 TiB sparse file as for a small one, and a
file may declare at most `max_size` bytes.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from ondemand_d.errors import ChunkNotFound, StoreError, UnknownName
from ondemand_d.store.local import DEFAULT_CHUNK_SIZE
from ondemand_d.store.model import Blob, Chunk, Image, check_key

#: The largest image file served unless the caller (images_max_size) says otherwise.
DEFAULT_MAX_SIZE = 1 << 40
#: Versions remembered (an object open on an older one gets EIO once it is forgotten).
MAX_VERSIONS = 4096
_INDEX_HEX = 16  # a chunk id: the version's first 48 hex digits, then the chunk index


@dataclass(frozen=True, slots=True)
class _Version:
    """One state of one file, as an OPEN saw it."""

    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int
    id: str  # 64 hex: the blob id of this version

    @classmethod
    def of(cls, path: Path, st: os.stat_result) -> _Version:
        ident = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_size}"
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                   hashlib.sha256(ident.encode()).hexdigest())

    def same(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.dev, self.ino, self.size, self.mtime_ns)


class _Chunks(Sequence[Chunk]):
    """The chunk table of a version, computed on demand (no list of a million chunks)."""

    def __init__(self, version: _Version, chunk_size: int) -> None:
        self._version = version
        self._size = chunk_size
        self._count = -(-version.size // chunk_size)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> Chunk: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Chunk, ...]: ...

    def __getitem__(self, i: int | slice) -> Chunk | tuple[Chunk, ...]:
        if isinstance(i, slice):
            return tuple(self._chunk(j) for j in range(*i.indices(self._count)))
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(i)
        return self._chunk(i)

    def _chunk(self, i: int) -> Chunk:
        off = i * self._size
        return Chunk(off, min(self._size, self._version.size - off),
                     self._version.id[:64 - _INDEX_HEX] + f"{i:0{_INDEX_HEX}x}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Chunks) and (self._version, self._size) == (
            other._version, other._size)

    def __hash__(self) -> int:
        return hash((self._version.id, self._size))


class _FileBlob(Blob):
    """A Blob whose chunks are `_Chunks`: fixed-size, found by arithmetic, never listed."""

    __slots__ = ("chunk_size",)

    def __init__(self, version: _Version, chunk_size: int, name: str) -> None:
        # Blob's own __init__ would check the table by walking it: nothing to check here.
        for attr, value in (("blob_id", version.id), ("size", version.size),
                            ("chunks", _Chunks(version, chunk_size)), ("extra", {"key": name}),
                            ("_starts", ()), ("chunk_size", chunk_size)):
            object.__setattr__(self, attr, value)

    def chunks_for(self, offset: int, length: int) -> tuple[Chunk, ...]:
        end = min(offset + length, self.size)
        if length <= 0 or offset >= end:
            return ()
        first = max(offset, 0) // self.chunk_size
        last = -(-end // self.chunk_size)
        return self.chunks[first:last]

    @property
    def is_remote(self) -> bool:
        return False


class ImagesDir:
    """A directory of image files as a read-only, unverified store."""

    def __init__(self, root: Path, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        if not root.is_dir():
            msg = f"--images {root}: not a directory of EROFS image files"
            raise StoreError(msg)
        self.root = root.absolute()
        self.chunk_size = chunk_size
        self.max_size = max_size
        self._versions: OrderedDict[str, tuple[_Version, _FileBlob]] = OrderedDict()
        self._by_prefix: dict[str, _Version] = {}  # a chunk id's version part -> version
        self._lock = threading.Lock()  # resolve runs on the I/O threads

    def resolve(self, key: bytes) -> Blob:
        """The file named `key` in the directory, as it is now, as a blob of fixed-size chunks.

        Raises:
            BadKey: the key could name something outside the directory.
            UnknownName: no regular file of that name.
            StoreError: the file declares more than `max_size` bytes.
        """
        name = check_key(key)  # no slash, no leading dot, no control bytes
        path = self.root / name
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            msg = f"no image file {name!r} in {self.root}"
            raise UnknownName(msg)
        if st.st_size > self.max_size:
            msg = (f"image file {path} declares {st.st_size} bytes, more than the "
                   f"{self.max_size} an image file may have here")
            raise StoreError(msg)
        version = _Version.of(path, st)
        with self._lock:
            known = self._versions.get(version.id)
            if known is not None:
                self._versions.move_to_end(version.id)
                return known[1]
            blob = _FileBlob(version, self.chunk_size, name)
            self._versions[version.id] = (version, blob)
            self._by_prefix[version.id[:64 - _INDEX_HEX]] = version
            while len(self._versions) > MAX_VERSIONS:
                old, _ = self._versions.popitem(last=False)
                self._by_prefix.pop(old[:64 - _INDEX_HEX], None)
        return blob

    def open_blob(self, key: bytes) -> Blob:
        """resolve() for an OPEN; nothing here is ever garbage collected, so no lease."""
        return self.resolve(key)

    def lease_settled(self, _blob_id: str | None, _open_blobs: set[str]) -> None:
        pass

    def keep_open(self, _open_blobs: set[str]) -> None:
        pass

    def chunk_path(self, digest: str) -> Path:
        """The file a chunk is read from (what a log line names: e.g. a read past the
        local read deadline)."""
        version = self._by_prefix.get(digest[:64 - _INDEX_HEX])
        return version.path if version is not None else self.root

    def read_chunk(self, chunk: Chunk) -> bytes:
        """The bytes at the chunk's place in its file, unverified, from the version it was
        cut from only.

        Raises:
            ChunkNotFound: the chunk is not of a known version, or the file is no longer
                that version (rewritten, replaced, or not a regular file any more).
        """
        version = self._by_prefix.get(chunk.digest[:64 - _INDEX_HEX])
        if version is None:
            raise ChunkNotFound(f"chunk {chunk.digest} is not in {self.root}")
        path = version.path
        off = int(chunk.digest[64 - _INDEX_HEX:], 16) * self.chunk_size
        try:
            # O_NONBLOCK: a FIFO swapped in must not hang the READ in open(2).
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            msg = f"{path} cannot be opened any more ({exc.strerror})"
            raise ChunkNotFound(msg) from None
        try:
            before = os.fstat(fd)
            data = os.pread(fd, chunk.length, off) if _is_version(before, version) else b""
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if not (_is_version(before, version) and version.same(after)):
            msg = (f"{path} changed since it was opened (rewritten or replaced): its READs "
                   "fail rather than mix two versions; unmount and mount it again")
            raise ChunkNotFound(msg)
        if len(data) != chunk.length:
            msg = f"{path} shrank while served ({len(data)} of {chunk.length} bytes at {off})"
            raise ChunkNotFound(msg)
        return data

    def get_blob(self, blob_id: str) -> Blob:
        known = self._versions.get(blob_id)
        if known is None:
            raise UnknownName(f"blob {blob_id} was not opened from {self.root}")
        return known[1]

    def get_image(self, name: str) -> Image:
        return Image(name, self.resolve(name.encode()).blob_id)

    def has_image(self, _name: str) -> bool:
        return False  # no bootstrap prefill: the kernel READs what it needs

    def images(self) -> Iterator[Image]:
        """Each file in the directory as an image of one blob (for `status`)."""
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            try:
                blob = self.resolve(entry.name.encode())
            except StoreError:
                continue
            yield Image(entry.name, blob.blob_id)

    def put_chunk(self, _data: bytes, _digest: str | None = None) -> str:  # pragma: no cover
        msg = "an images directory is read-only"
        raise StoreError(msg)


def _is_version(st: os.stat_result, version: _Version) -> bool:
    return stat.S_ISREG(st.st_mode) and version.same(st)
