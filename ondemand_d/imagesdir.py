# SPDX-License-Identifier: Apache-2.0
"""`serve --images DIR`: plain EROFS image files, named by cookie key, served as they are.

For people debugging a kernel or an image format: a fresh `mkfs.erofs` output in DIR
is mountable at once (`mount -t erofs none -o fsid=<file name> /mnt`, a `--blobdev` blob
by `device=<file name>`), as the kernel authors' reference daemon does. Nothing is
imported and **nothing is verified**: the bytes are whatever the file holds when the
kernel asks (the daemon says so in its log at start-up).

`ImagesDir` offers what the service and the control views use of a `LocalStore`:
keys resolve to blobs cut into chunks, and chunks read straight from the file.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from ondemand_d.errors import ChunkNotFound, StoreError, UnknownName
from ondemand_d.store.local import DEFAULT_CHUNK_SIZE
from ondemand_d.store.model import Blob, Chunk, Image, check_key


class ImagesDir:
    """A directory of image files as a read-only, unverified store."""

    def __init__(self, root: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not root.is_dir():
            msg = f"--images {root}: not a directory of EROFS image files"
            raise StoreError(msg)
        self.root = root.absolute()
        self.chunk_size = chunk_size
        self._blobs: dict[str, Blob] = {}
        self._versions: dict[str, Blob] = {}  # file version -> its blob
        self._places: dict[str, tuple[Path, int, int]] = {}  # chunk id -> file, offset, len
        self._lock = threading.Lock()  # resolve runs on the I/O threads

    def resolve(self, key: bytes) -> Blob:
        """The file named `key` in the directory, as a blob of fixed-size chunks.

        Raises:
            BadKey: the key could name something outside the directory.
            UnknownName: no regular file of that name.
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
        # An id per version of the file: a rewritten image is a new blob.
        ident = f"{path}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_size}"
        version = hashlib.sha256(ident.encode()).hexdigest()
        with self._lock:
            blob = self._versions.get(version)
            if blob is None:
                chunks = []
                for off in range(0, st.st_size, self.chunk_size):
                    length = min(self.chunk_size, st.st_size - off)
                    cid = hashlib.sha256(f"{version}:{off}".encode()).hexdigest()
                    self._places[cid] = (path, off, length)
                    chunks.append(Chunk(off, length, cid))
                # The blob id is the content id of this (made-up) chunk table, as in a store.
                blob = Blob.of(tuple(chunks), {"key": name})
                self._versions[version] = self._blobs[blob.blob_id] = blob
        return blob

    def open_blob(self, key: bytes) -> Blob:
        """resolve() for an OPEN; nothing here is ever garbage collected, so no lease."""
        return self.resolve(key)

    def lease_settled(self, _blob_id: str | None, _open_blobs: set[str]) -> None:
        pass

    def keep_open(self, _open_blobs: set[str]) -> None:
        pass

    def read_chunk(self, chunk: Chunk) -> bytes:
        """The bytes at the chunk's place in its file, unverified."""
        try:
            path, off, length = self._places[chunk.digest]
        except KeyError:
            raise ChunkNotFound(f"chunk {chunk.digest} is not in {self.root}") from None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            data = os.pread(fd, length, off)
        finally:
            os.close(fd)
        if len(data) != length:
            msg = f"{path} shrank while served ({len(data)} of {length} bytes at {off})"
            raise ChunkNotFound(msg)
        return data

    def get_blob(self, blob_id: str) -> Blob:
        try:
            return self._blobs[blob_id]
        except KeyError:
            raise UnknownName(f"blob {blob_id} was not opened from {self.root}") from None

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
