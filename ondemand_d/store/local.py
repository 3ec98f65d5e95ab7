# SPDX-License-Identifier: Apache-2.0
"""The local content-addressed store on disk.

Layout under the store root::

    chunks/ab/abcdef...   chunk bytes, named by their sha256, written once, read-only
    blobs/<id>.json       a blob's chunk table (Blob.to_json)
    images/<name>.json    an image: bootstrap blob and device keys (Image.to_json)
    names/<sha256(key)>   cookie key -> blob id, as JSON {"key": ..., "blob": ...}
    tmp/                  staging for atomic writes
    lock                  flock()ed by writers (import, build, add); readers never lock

Every file is written to tmp/ and renamed into place, so a reader (the daemon)
sees a record whole or not at all, and a crash leaves at most stray tmp files.
Names are files named by a hash of the key, so a key can never become a path.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondemand_d.errors import ChunkNotFound, StoreError, UnknownName
from ondemand_d.store.model import PAGE, Blob, Chunk, Image, check_digest, check_key, check_name
from ondemand_d.store.verify import verified

#: Chunk size used when a blob is ingested whole (import); the daemon fills a
#: whole chunk per READ, and vm.md measured 1 MiB as a good trade.
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass
class _Undo:
    """What a transaction created, so a failed one can take it back."""

    paths: list[Path] = field(default_factory=list)
    unsynced: bool = False  # files written without fsync since the last sync


class LocalStore:
    """Chunks, blobs, images and names under one directory."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            for sub in ("chunks", "blobs", "images", "names", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        elif not (self.root / "chunks").is_dir():
            msg = f"{self.root} is not an ondemand-d store (no chunks/ directory)"
            raise StoreError(msg)
        self._chunk_dir = str(self.root / "chunks")
        self._blob_cache: dict[str, tuple[int, Blob]] = {}
        self._undo: _Undo | None = None

    # -- chunks -----------------------------------------------------------------

    def chunk_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "chunks" / digest[:2] / digest

    def has_chunk(self, digest: str) -> bool:
        return self.chunk_path(digest).exists()

    def put_chunk(self, data: bytes | memoryview, digest: str | None = None) -> str:
        """Store `data` under its sha256 (computed here unless given); return the digest.

        Idempotent: a chunk already present is not written again.
        """
        if digest is None:
            digest = hashlib.sha256(data).hexdigest()
        path = self.chunk_path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(exist_ok=True)
        self._write_atomic(path, bytes(data), mode=0o444)
        return digest

    def read_chunk(self, chunk: Chunk) -> bytes:
        """Read a chunk's bytes and verify them against its digest.

        On the READ hot path: plain os calls on a string path (the digest was
        checked when its Blob was loaded), one read of length+1 to catch a
        chunk file that grew.
        """
        d = chunk.digest
        try:
            fd = os.open(f"{self._chunk_dir}/{d[:2]}/{d}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkNotFound(f"chunk {d} is not in the store {self.root}") from None
        try:
            data = os.read(fd, chunk.length + 1)
        finally:
            os.close(fd)
        return verified(chunk, data)

    # -- blobs ------------------------------------------------------------------

    def put_blob(self, blob: Blob) -> None:
        path = self.root / "blobs" / f"{blob.blob_id}.json"
        self._write_atomic(path, _dumps(blob.to_json()))
        self._blob_cache.pop(blob.blob_id, None)

    def has_blob(self, blob_id: str) -> bool:
        return (self.root / "blobs" / f"{check_digest(blob_id)}.json").exists()

    def get_blob(self, blob_id: str) -> Blob:
        """Load a blob's chunk table; cached while its file is unchanged."""
        path = self.root / "blobs" / f"{check_digest(blob_id)}.json"
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise UnknownName(f"blob {blob_id} is not in the store {self.root}") from None
        cached = self._blob_cache.get(blob_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        blob = Blob.from_json(_load(path))
        self._blob_cache[blob_id] = (stamp, blob)
        return blob

    def blobs(self) -> Iterator[Blob]:
        for path in sorted((self.root / "blobs").glob("*.json")):
            yield self.get_blob(path.stem)

    # -- names ------------------------------------------------------------------

    def _name_path(self, key: str) -> Path:
        return self.root / "names" / hashlib.sha256(key.encode()).hexdigest()

    def bind_name(self, key: str, blob_id: str, *, replace: bool = False) -> None:
        """Make cookie key `key` resolve to `blob_id`."""
        check_key(key.encode())
        check_digest(blob_id)
        path = self._name_path(key)
        if path.exists() and not replace:
            current = _load(path)["blob"]
            if current != blob_id:
                msg = f"name {key!r} already names blob {current}; remove that image first"
                raise StoreError(msg)
            return
        self._write_atomic(path, _dumps({"key": key, "blob": blob_id}))

    def unbind_name(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._name_path(key).unlink()

    def resolve(self, key: bytes) -> Blob:
        """Map a cookie key from the kernel to its blob.

        A key resolves through the name index; failing that, a key that is a
        blob id (the device tags the builder writes) names that blob.

        Raises:
            BadKey: the key is not acceptable as a lookup key.
            UnknownName: nothing is registered under it.
        """
        text = check_key(key)
        path = self._name_path(text)
        try:
            record = _load(path)
        except FileNotFoundError:
            record = None
        if record is not None and record.get("key") == text:
            return self.get_blob(str(record["blob"]))
        if len(text) == 64 and self.has_blob(text):  # noqa: PLR2004 - a sha256 hex id
            return self.get_blob(text)
        msg = f"no image or blob is registered under {text!r}"
        raise UnknownName(msg)

    # -- images -----------------------------------------------------------------

    def put_image(self, image: Image, *, replace: bool = False) -> None:
        """Register an image and bind its fsid and device keys. Blobs must exist.

        The image record is what makes an import or build visible, so
        everything written before it is made durable first.
        """
        check_name(image.name)
        self._make_durable()
        for blob_id in image.blob_ids:
            if not self.has_blob(blob_id):
                raise UnknownName(f"image {image.name}: blob {blob_id} is not in the store")
        path = self.root / "images" / f"{image.name}.json"
        if path.exists() and not replace:
            msg = f"an image named {image.name!r} exists; pass --replace or pick another name"
            raise StoreError(msg)
        self.bind_name(image.name, image.bootstrap, replace=True)
        for key, blob_id in image.devices:
            if key != blob_id:
                self.bind_name(key, blob_id, replace=replace)
        self._write_atomic(path, _dumps(image.to_json()))

    def get_image(self, name: str) -> Image:
        try:
            return Image.from_json(_load(self.root / "images" / f"{check_name(name)}.json"))
        except FileNotFoundError:
            raise UnknownName(f"no image named {name!r} in {self.root}") from None

    def has_image(self, name: str) -> bool:
        """Whether `name` is an image's name (so its blob is a bootstrap)."""
        try:
            check_name(name)
        except StoreError:
            return False
        return (self.root / "images" / f"{name}.json").exists()

    def images(self) -> Iterator[Image]:
        for path in sorted((self.root / "images").glob("*.json")):
            yield Image.from_json(_load(path))

    def remove_image(self, name: str) -> None:
        image = self.get_image(name)
        (self.root / "images" / f"{name}.json").unlink()
        self.unbind_name(image.name)

    # -- ingest -----------------------------------------------------------------

    def ingest_file(self, path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Blob:
        """Store a whole file as one blob, cut into `chunk_size` chunks."""
        if chunk_size <= 0 or chunk_size % PAGE:
            msg = f"chunk size {chunk_size} is not a positive multiple of {PAGE}"
            raise StoreError(msg)
        whole = hashlib.sha256()
        chunks: list[Chunk] = []
        with open(path, "rb") as f:
            while data := f.read(chunk_size):
                whole.update(data)
                offset = chunks[-1].end if chunks else 0
                chunks.append(Chunk(offset, len(data), self.put_chunk(data)))
        blob = Blob(whole.hexdigest(), sum(c.length for c in chunks), tuple(chunks))
        if not blob.chunks:
            msg = f"{path} is empty; an empty file is not a blob"
            raise StoreError(msg)
        self.put_blob(blob)
        return blob

    # -- writes -----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LocalStore]:
        """Hold the writer lock; on an exception remove every file written inside.

        Records written inside are only visible once renamed into place, and the
        caller writes the image (the commit point) last, so a failed import or
        build leaves the store as it found it.
        """
        lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._undo = _Undo()
            try:
                yield self
                self._make_durable()
            except BaseException:
                for p in reversed(self._undo.paths):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                self._blob_cache.clear()
                raise
            finally:
                self._undo = None
        finally:
            os.close(lock)

    def _make_durable(self) -> None:
        """Flush what a transaction wrote without fsync (one sync instead of one per file)."""
        if self._undo is not None and self._undo.unsynced:
            os.sync()
            self._undo.unsynced = False

    def _write_atomic(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        existed = path.exists()
        tmp = self.root / "tmp" / f"{path.name}.{os.getpid()}.{id(data):x}"
        # Inside a transaction, put_image() and the end sync once instead.
        undo = self._undo
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if undo is not None:
                    undo.unsynced = True
                else:
                    os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                msg = f"store {self.root} is full while writing {path.name}"
                raise StoreError(msg) from exc
            raise
        if self._undo is not None and not existed:
            self._undo.paths.append(path)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        msg = f"{path} is not a JSON object"
        raise StoreError(msg)
    return raw
