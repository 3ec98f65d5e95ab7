# SPDX-License-Identifier: Apache-2.0
"""The local content-addressed store on disk.

Layout under the store root::

    format                "ondemand-d store 2": refused if missing or different
    chunks/ab/abcdef...   chunk bytes, named by their sha256
    blobs/<id>.json       a blob's chunk table; <id> = content_id(table), never rewritten
    images/<name>.json    an image: bootstrap, device keys (replaced only by --replace)
    keys/<sha256(key)>/<image>  {"key", "image"}: image lists free device key `key`
    dedup/<id>.json       extents the builder hashed itself while writing blob <id>
    quarantine/           damaged files moved aside (fsck, or on rewrite)
    leases/               blob ids a running daemon has open (see gc.py)
    tmp/                  staging for atomic writes
    lock                  flock()ed by writers (import, build, add, rm, gc)

Trust: a blob record is named by its content and checked against it on load,
so it can only ever be written once with one meaning. A cookie key resolves
as a blob id (which commits to the content), as an image name (its
bootstrap), or as a free device key through the images that list it. An image
whose name is another's device key, or whose device key is another's name or
names other content there, is refused: nothing an image brings can rebind what
another image's keys name. Images may share a device key for the same blob
(two mkfs.erofs imports of one data blob in a share domain).

Durability: every record is written to tmp/, fsync'd, renamed into place and
its directory fsync'd; chunks written inside a transaction are flushed with
one syncfs before the first record that can reach them. An image record is
the commit point of import, build and add.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ondemand_d.errors import ChunkNotFound, StoreError, UnknownName
from ondemand_d.store import durable
from ondemand_d.store.lease import Lease, gc_lock
from ondemand_d.store.model import (
    PAGE,
    Blob,
    Chunk,
    Image,
    check_digest,
    check_key,
    check_name,
    is_content_id,
)
from ondemand_d.store.verify import verified

log = structlog.get_logger()

#: Chunk size used when a blob is ingested whole (import); the daemon fills a
#: whole chunk per READ, and vm.md measured 1 MiB as a good trade.
DEFAULT_CHUNK_SIZE = 1 << 20
FORMAT = "ondemand-d store 2\n"
_SUBDIRS = ("chunks", "blobs", "images", "keys", "dedup", "quarantine", "leases", "tmp")
_tmp_names = itertools.count()


@dataclass
class _Undo:
    """What a transaction created, so a failed one can take it back."""

    paths: list[Path] = field(default_factory=list)
    unsynced: bool = False  # chunk files renamed into place since the last syncfs


@dataclass(frozen=True, slots=True)
class Damaged:
    """A record that could not be read: the file and what is wrong with it."""

    path: Path
    error: str


class LocalStore:
    """Chunks, blobs, images and key ownership under one directory."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self._chunk_dir = str(self.root / "chunks")
        self._blob_cache: dict[str, tuple[tuple[int, int], Blob]] = {}
        self._undo: _Undo | None = None
        self._lease: Lease | None = None
        fmt = self.root / "format"
        if (self.root / "names").is_dir():
            msg = (
                f"{self.root} was written by an older ondemand-d (store format 1, whose names "
                "and blob ids could be rebound); create a new store and import, build or add "
                "the images again"
            )
            raise StoreError(msg)
        if create and not fmt.exists():
            for sub in _SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._write_record(fmt, FORMAT.encode())
        try:
            found = fmt.read_text()
        except FileNotFoundError:
            msg = f"{self.root} is not an ondemand-d store (no format file)"
            raise StoreError(msg) from None
        except UnicodeDecodeError:
            found = "?"
        if found != FORMAT:
            msg = f"{self.root}: unknown store format {found.strip()!r}; expected {FORMAT.strip()!r}"
            raise StoreError(msg)
        for sub in _SUBDIRS:  # a store made by an older version of format 2 may lack some
            (self.root / sub).mkdir(exist_ok=True)

    # -- chunks -----------------------------------------------------------------

    def chunk_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "chunks" / digest[:2] / digest

    def has_chunk(self, digest: str) -> bool:
        return self.chunk_path(digest).exists()

    def chunk_ok(self, digest: str, length: int | None = None) -> bool:
        """Whether the chunk file exists and hashes to its name (and has `length` bytes)."""
        try:
            with open(self.chunk_path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False
        if length is not None and len(data) != length:
            return False
        return hashlib.sha256(data).hexdigest() == digest

    def put_chunk(self, data: bytes | memoryview, digest: str | None = None) -> str:
        """Store `data` under its sha256 and return the digest.

        The digest is always computed here (`digest`, if given, must match). A
        chunk file already present is kept only if it verifies; a damaged one
        (say, empty after a power loss) is quarantined and written again.
        """
        got = hashlib.sha256(data).hexdigest()
        if digest is not None and digest != got:
            msg = f"chunk bytes hash to {got}, not {digest}"
            raise StoreError(msg)
        path = self.chunk_path(got)
        if path.exists():
            if self.chunk_ok(got, len(data)):
                return got
            self.quarantine(path)
        path.parent.mkdir(exist_ok=True)
        in_txn = self._undo is not None
        self._write(path, data, mode=0o444, sync=not in_txn)
        if self._undo is not None:
            self._undo.unsynced = True
        else:
            durable.fsync_dir(path.parent)
        return got

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

    def quarantine(self, path: Path) -> Path:
        """Move a damaged file out of the way (kept for inspection); return where it went."""
        dest = self.root / "quarantine" / f"{path.parent.name}.{path.name}.{next(_tmp_names)}"
        dest = dest.with_name(f"{dest.name}.{os.getpid()}")
        durable.rename(path, dest)
        durable.fsync_dir(path.parent)
        self._blob_cache.clear()
        return dest

    # -- blobs ------------------------------------------------------------------

    def blob_path(self, blob_id: str) -> Path:
        return self.root / "blobs" / f"{check_digest(blob_id)}.json"

    def put_blob(self, blob: Blob) -> None:
        """Record a blob. A blob id names one content, so an existing sound record is kept."""
        path = self.blob_path(blob.blob_id)
        if path.exists():
            try:
                self.get_blob(blob.blob_id)
                return
            except StoreError:
                self.quarantine(path)
        self._make_durable()  # its chunks before the record that reaches them
        self._write_record(path, _dumps(blob.to_json()))

    def has_blob(self, blob_id: str) -> bool:
        return self.blob_path(blob_id).exists()

    def get_blob(self, blob_id: str) -> Blob:
        """Load a blob's chunk table, checked against its id; cached while the file is unchanged.

        Raises:
            UnknownName: no such blob.
            StoreError: the record is damaged.
        """
        path = self.blob_path(blob_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UnknownName(f"blob {blob_id} is not in the store {self.root}") from None
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._blob_cache.get(blob_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        blob = Blob.from_json(_load(path))
        if blob.blob_id != blob_id:
            msg = f"{path} holds blob {blob.blob_id}"
            raise StoreError(msg)
        self._blob_cache[blob_id] = (stamp, blob)
        return blob

    def blob_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "blobs").glob("*.json"))

    # -- images and keys --------------------------------------------------------

    def _image_path(self, name: str) -> Path:
        return self.root / "images" / f"{check_name(name)}.json"

    def _key_dir(self, key: str) -> Path:
        return self.root / "keys" / hashlib.sha256(key.encode()).hexdigest()

    def key_users(self, key: str) -> list[Image]:
        """The images whose current record lists free device key `key` (readable ones)."""
        users = []
        try:
            entries = sorted(os.listdir(self._key_dir(key)))
        except FileNotFoundError:
            return []
        for name in entries:
            try:
                image = self.get_image(name)
            except StoreError:
                continue  # gone, or damaged: answers for nothing
            if any(k == key for k, _ in image.devices):
                users.append(image)
        return users

    def resolve(self, key: bytes) -> Blob:
        """Map a cookie key from the kernel to its blob.

        A key with the form of a blob id names that blob: the id commits to its
        content. An image's name gives its bootstrap. Any other key is a device
        key, and resolves through the images that list it, which all agree on
        its blob (put_image refuses an image that would disagree).

        Raises:
            BadKey: the key is not acceptable as a lookup key.
            UnknownName: nothing is registered under it.
            StoreError: a record on the way is damaged.
        """
        text = check_key(key)
        if is_content_id(text):
            return self.get_blob(text)
        if self.has_image(text):
            return self.get_blob(self.get_image(text).bootstrap)
        for image in self.key_users(text):
            blob_id = image.blob_for(text)
            if blob_id is not None:
                return self.get_blob(blob_id)
        msg = f"no image or blob is registered under {text!r}"
        raise UnknownName(msg)

    def open_blob(self, key: bytes) -> Blob:
        """resolve() for the daemon's OPEN: the blob is in this process's lease before
        gc can judge it (see lease.py); `lease_settled` ends the OPEN."""
        with gc_lock(self.root, exclusive=False):
            blob = self.resolve(key)
            self.lease.begin(blob.blob_id)
        return blob

    def lease_settled(self, blob_id: str | None, open_blobs: set[str]) -> None:
        """An OPEN was answered; `open_blobs` are the blobs of every open object now."""
        self.lease.settle(blob_id, open_blobs)

    def keep_open(self, open_blobs: set[str]) -> None:
        """Objects closed: the lease now covers only `open_blobs` (and OPENs in progress)."""
        self.lease.keep(open_blobs)

    @property
    def lease(self) -> Lease:
        if self._lease is None:
            self._lease = Lease(self.root)
        return self._lease

    def _check_keys(self, image: Image) -> None:
        """Refuse an image whose name or free device keys would answer for another image's."""
        for name in self.key_user_names(image.name):
            msg = (
                f"{image.name!r} is already a device key of image {name!r}; an image name "
                "cannot also be another image's device key (pick another name)"
            )
            raise StoreError(msg)
        for key, blob_id in image.devices:
            if is_content_id(key):
                continue
            if self.has_image(key):
                msg = (
                    f"device key {key!r} is already the name of image {key!r}; give this "
                    "blob another key (--blob PATH=KEY)"
                )
                raise StoreError(msg)
            for other in self.key_users(key):
                if other.name != image.name and other.blob_for(key) != blob_id:
                    msg = (
                        f"device key {key!r} already names another blob, of image "
                        f"{other.name!r}; give this blob another key (--blob PATH=KEY), or "
                        "remove that image"
                    )
                    raise StoreError(msg)

    @staticmethod
    def load_record(path: Path) -> dict[str, Any]:
        """A JSON record; StoreError if damaged, FileNotFoundError if absent."""
        return _load(path)

    def key_entry_key(self, entry: Path) -> str | None:
        """The key a keys/ entry file is for, or None if the entry is damaged or misplaced."""
        try:
            key = str(_load(entry)["key"])
        except (OSError, StoreError, KeyError):
            return None
        return key if self._key_dir(key) == entry.parent else None

    def key_user_names(self, key: str) -> list[str]:
        """Names of the images other than `key` itself that list `key` as a device key."""
        return [i.name for i in self.key_users(key) if i.name != key]

    def put_image(self, image: Image, *, replace: bool = False) -> None:
        """Register an image: its key entries first, then its record (the commit point).

        Callers hold the writer lock (transaction), so the checks and the writes
        are one step for every other writer. A key entry answers nothing until
        a record listing the key exists, and the record is written only once
        every blob it needs is durable. With `replace`, the old record stays
        whole until the new one replaces it.
        """
        path = self._image_path(image.name)
        for blob_id in image.blob_ids:
            self.get_blob(blob_id)  # present and sound
        old: Image | None = None
        if path.exists():
            if not replace:
                msg = f"an image named {image.name!r} exists; pass --replace or pick another name"
                raise StoreError(msg)
            with contextlib.suppress(StoreError):
                old = self.get_image(image.name)
        self._check_keys(image)
        for key in image.owned_keys[1:]:
            entry = self._key_dir(key) / image.name
            if not entry.exists():
                entry.parent.mkdir(exist_ok=True)
                self._write_record(entry, _dumps({"key": key, "image": image.name}))
        self._make_durable()
        self._write(path, _dumps(image.to_json()), mode=0o644, sync=True)  # the commit
        if self._undo is not None:
            self._undo.paths.clear()  # committed: nothing after this point is taken back
        try:
            durable.fsync_dir(path.parent)
        except OSError as exc:  # the image is in place; a power loss now could only undo it
            log.warning("image_not_durable", image=image.name, error=str(exc))
        if old is not None:
            self._release(image.name, set(old.owned_keys[1:]) - set(image.owned_keys[1:]))

    def _release(self, name: str, keys: set[str] | tuple[str, ...]) -> None:
        """Drop image `name`'s key entries for `keys` (after its record stopped listing them)."""
        for key in keys:
            with contextlib.suppress(OSError):
                durable.unlink(self._key_dir(key) / name)
                with contextlib.suppress(OSError):
                    self._key_dir(key).rmdir()

    def get_image(self, name: str) -> Image:
        """Raises UnknownName if there is no such image, StoreError if its record is damaged."""
        path = self._image_path(name)
        try:
            image = Image.from_json(_load(path))
        except FileNotFoundError:
            raise UnknownName(f"no image named {name!r} in {self.root}") from None
        if image.name != name:
            msg = f"{path} holds image {image.name!r}"
            raise StoreError(msg)
        return image

    def has_image(self, name: str) -> bool:
        """Whether `name` is an image's name (so its blob is a bootstrap)."""
        try:
            return self._image_path(name).exists()
        except StoreError:
            return False

    def scan_images(self) -> tuple[list[Image], list[Damaged]]:
        """Every readable image, and the records that could not be read."""
        good: list[Image] = []
        bad: list[Damaged] = []
        for path in sorted((self.root / "images").glob("*.json")):
            try:
                good.append(self.get_image(path.stem))
            except (StoreError, OSError) as exc:
                bad.append(Damaged(path, str(exc)))
        return good, bad

    def images(self) -> Iterator[Image]:
        """Every readable image (see scan_images for the damaged ones)."""
        yield from self.scan_images()[0]

    def remove_image(self, name: str) -> Image | None:
        """Unregister image `name` (its blobs stay until gc); return its record if readable."""
        path = self._image_path(name)
        if not path.exists():
            raise UnknownName(f"no image named {name!r} in {self.root}")
        image = None
        with contextlib.suppress(StoreError):
            image = self.get_image(name)
        durable.unlink(path)
        durable.fsync_dir(path.parent)
        if image is not None:
            self._release(name, image.owned_keys[1:])
        return image

    # -- the builder's dedup index ----------------------------------------------

    def put_dedup(self, blob_id: str, extents: list[list[Any]]) -> None:
        """Record extents [sha256, offset, length] the builder hashed while writing `blob_id`.

        Only the local builder calls this: nothing an imported or added image
        declares ever becomes a dedup source.
        """
        path = self.root / "dedup" / f"{check_digest(blob_id)}.json"
        if path.exists():
            return
        self._write_record(path, _dumps({"blob": blob_id, "extents": extents}))

    def dedup_records(self) -> Iterator[tuple[str, list[list[Any]]]]:
        """(blob id, extents) for each local blob that still exists, in blob-id order."""
        for path in sorted((self.root / "dedup").glob("*.json")):
            try:
                raw = _load(path)
                blob_id = check_digest(str(raw["blob"]))
                if blob_id != path.stem or not self.has_blob(blob_id):
                    continue
                yield blob_id, list(raw["extents"])
            except (StoreError, KeyError, TypeError, ValueError):
                continue  # a damaged index only costs dedup; fsck reports it

    # -- ingest -----------------------------------------------------------------

    def ingest_file(self, path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Blob:
        """Store a whole file as one blob, cut into `chunk_size` chunks (streamed)."""
        if chunk_size <= 0 or chunk_size % PAGE:
            msg = f"chunk size {chunk_size} is not a positive multiple of {PAGE}"
            raise StoreError(msg)
        chunks: list[Chunk] = []
        offset = 0
        with open(path, "rb") as f:
            while data := f.read(chunk_size):
                chunks.append(Chunk(offset, len(data), self.put_chunk(data)))
                offset += len(data)
        if not chunks:
            msg = f"{path} is empty; an empty file is not a blob"
            raise StoreError(msg)
        blob = Blob.of(tuple(chunks))
        self.put_blob(blob)
        return blob

    # -- writes -----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LocalStore]:
        """Hold the writer lock; on an exception remove every file created inside.

        The caller writes the image record (the commit point) last, so a failed
        import or build leaves the store as it found it.
        """
        with self.writer_lock():
            self._undo = _Undo()
            try:
                yield self
                self._make_durable()
            except BaseException:
                for p in reversed(self._undo.paths):
                    with contextlib.suppress(OSError):
                        p.unlink()
                self._blob_cache.clear()
                raise
            finally:
                self._undo = None

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Exclusive against other writers (import, build, add, rm, gc); readers never lock."""
        lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)

    def _make_durable(self) -> None:
        """Flush the chunks written since the last flush (one syncfs, not one fsync each)."""
        if self._undo is not None and self._undo.unsynced:
            durable.syncfs(self.root)
            self._undo.unsynced = False

    def _tmp(self, path: Path) -> Path:
        return self.root / "tmp" / f"{path.name}.{os.getpid()}.{next(_tmp_names)}"

    def _write(self, path: Path, data: bytes | memoryview, *, mode: int, sync: bool) -> None:
        """Write `data` to tmp/ and rename it to `path` (no directory fsync)."""
        existed = path.exists()
        tmp = self._tmp(path)
        try:
            durable.write_tmp(tmp, data, mode, sync=sync)
            durable.rename(tmp, path)
        except OSError as exc:
            _raise_if_full(exc, self.root, path)
            raise
        if self._undo is not None and not existed:
            self._undo.paths.append(path)

    def _write_record(self, path: Path, data: bytes) -> None:
        """A record: durable before its name exists, its name durable before we return."""
        self._write(path, data, mode=0o644, sync=True)
        try:
            durable.fsync_dir(path.parent)
        except OSError as exc:
            _raise_if_full(exc, self.root, path)
            raise


def _raise_if_full(exc: OSError, root: Path, path: Path) -> None:
    """A full disk becomes a StoreError that says so; other errors pass through."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = f"store {root} is full while writing {path.name}: free some space (ondemand-d gc)"
        raise StoreError(msg) from exc


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _load(path: Path) -> dict[str, Any]:
    """A record as a dict. Raises FileNotFoundError, or StoreError if it is not JSON."""
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"{path} is damaged ({'empty' if not path.stat().st_size else 'not JSON'}: {exc})"
        raise StoreError(msg) from None
    if not isinstance(raw, dict):
        msg = f"{path} is damaged (not a JSON object)"
        raise StoreError(msg)
    return raw
