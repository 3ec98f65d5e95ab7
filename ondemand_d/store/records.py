# SPDX-License-Identifier: Apache-2.0
"""Records on disk: chunks, blob records, the dedup index, and how each is written.

Layout under the store root (the names, `images/` and `keys/`, are local.py's)::

    format                "ondemand-d store 2": refused if missing or different
    chunks/ab/abcdef...   chunk bytes, named by their sha256
    blobs/<id>.json       a blob's chunk table; <id> = content_id(table), never rewritten
    locations/<loc>.json  where one image fetches one blob; <loc> = sha256 of the record
    dedup/<id>.json       extents the builder hashed itself while writing blob <id>
    quarantine/           damaged files moved aside (fsck, or on rewrite)
    leases/               blob ids a running daemon has open (lease.py)
    tmp/                  staging for atomic writes
    lock                  flock()ed by writers (import, build, add, rm, gc)

A blob record is named by its content and checked against it on load, so it
can only ever be written once with one meaning; a record or chunk already
present is verified before it is trusted, and a damaged one is replaced.

Durability: every record is written to tmp/, fsync'd, renamed into place and
its directory fsync'd; chunks written inside a transaction are flushed with
one syncfs before the first record that can reach them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondemand_d.errors import ChunkNotFound, DigestMismatch, StoreError, UnknownName
from ondemand_d.store import durable
from ondemand_d.store.model import PAGE, Blob, Chunk, Location, check_digest
from ondemand_d.store.verify import check, verified

#: Chunk size used when a blob is ingested whole (import); the daemon fills a
#: whole chunk per READ, and vm.md measured 1 MiB as a good trade.
DEFAULT_CHUNK_SIZE = 1 << 20
FORMAT = "ondemand-d store 2\n"
_SUBDIRS = ("chunks", "blobs", "locations", "images", "keys", "dedup", "quarantine", "leases",
            "tmp")
_tmp_names = itertools.count()


@dataclass
class _Undo:
    """What a transaction created, so a failed one can take it back."""

    paths: list[Path] = field(default_factory=list)
    unsynced: bool = False  # chunk files renamed into place since the last syncfs


class RecordStore:
    """Chunks, blob records and the dedup index under one directory (LocalStore adds names)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self._chunk_dir = str(self.root / "chunks")
        self._blob_cache: dict[str, tuple[tuple[int, int], Blob]] = {}
        self._undo: _Undo | None = None
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
            fd = self._open_chunk(check_digest(digest))
        except (ChunkNotFound, DigestMismatch):
            return False
        with open(fd, "rb") as f:
            data = f.read()
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

    def _open_chunk(self, digest: str) -> int:
        """A read fd on chunk `digest`'s file, which is a regular file (checked on the fd).

        Anything else planted in the store must not hang a READ: opening a FIFO without
        O_NONBLOCK waits for a writer forever (and so would its READ and I/O thread),
        O_NOFOLLOW refuses a symlink out of the store.

        Raises:
            ChunkNotFound: no file of that name.
            DigestMismatch: a file that cannot be a chunk (a remote source may replace it).
        """
        path = f"{self._chunk_dir}/{digest[:2]}/{digest}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ChunkNotFound(f"chunk {digest} is not in the store {self.root}") from None
        except OSError as exc:  # ELOOP (a symlink), ENXIO (a socket), EACCES, ...
            msg = (f"chunk {digest}: its file {path} cannot be opened ({exc.strerror}): "
                   "`ondemand-d fsck --repair` moves it aside")
            raise DigestMismatch(msg) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            msg = (f"chunk {digest}: its file {path} is {_kind(mode)}, not a regular file: "
                   "`ondemand-d fsck --repair` moves it aside")
            raise DigestMismatch(msg)
        return fd

    def read_chunk(self, chunk: Chunk) -> bytes:
        """Read a chunk's bytes and verify them against its digest.

        On the READ hot path: plain os calls on a string path (the digest was
        checked when its Blob was loaded), one read of length+1 to catch a
        chunk file that grew.
        """
        fd = self._open_chunk(chunk.digest)
        try:
            data = os.read(fd, chunk.length + 1)
        finally:
            os.close(fd)
        return verified(chunk, data)

    def read_chunk_into(self, chunk: Chunk, buf: Any, at: int = 0) -> None:
        """read_chunk into buf[at:at+length] (e.g. a pooled aligned buffer), verified there.

        No bytes object is made: the fill path can write `buf` to the cache file
        as it is. On DigestMismatch or ChunkNotFound, buf's range holds garbage.
        """
        view = memoryview(buf).cast("B")[at : at + chunk.length]
        if len(view) != chunk.length:
            msg = f"chunk {chunk.digest}: {chunk.length} bytes do not fit at {at} of the buffer"
            raise ValueError(msg)
        d = chunk.digest
        fd = self._open_chunk(d)
        extra = bytearray(1)  # a byte past the length: catches a chunk file that grew
        got = 0
        try:
            while True:
                n = os.readv(fd, [view[got:], extra] if got < len(view) else [extra])
                if n == 0:
                    break
                got += n
                if got > len(view):
                    break
        finally:
            os.close(fd)
        if got != chunk.length:
            found = f"{got} bytes" if got < chunk.length else "more bytes"
            msg = f"chunk {d}: {found}, expected {chunk.length}"
            raise DigestMismatch(msg)
        check(chunk, view)

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

    # -- locations --------------------------------------------------------------

    def location_path(self, location_id: str) -> Path:
        return self.root / "locations" / f"{check_digest(location_id)}.json"

    def put_location(self, location: Location) -> str:
        """Record where an image fetches a blob; return the record's id (its sha256).

        Named by its content like a blob record: an existing sound record is kept.
        """
        location_id = location.location_id
        path = self.location_path(location_id)
        if path.exists():
            try:
                self.get_location(location_id)
                return location_id
            except StoreError:
                self.quarantine(path)
        self._write_record(path, location.dumps())
        return location_id

    def get_location(self, location_id: str) -> Location:
        """Load a location record, checked against its name.

        Raises:
            UnknownName: no such record (e.g. removed by gc with its image).
            StoreError: the record is damaged or unreadable.
        """
        path = self.location_path(location_id)
        try:
            location = Location.from_json(_load(path))
        except FileNotFoundError:
            raise UnknownName(f"location {location_id} is not in the store {self.root}") from None
        except OSError as exc:
            msg = f"{path} is unreadable ({exc.strerror})"
            raise StoreError(msg) from None
        if location.location_id != location_id:
            msg = f"{path} is damaged (its content does not match its name)"
            raise StoreError(msg)
        return location

    def location_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "locations").glob("*.json"))

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
    def transaction(self) -> Iterator[RecordStore]:
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
    """A record as a dict, read only from a regular file (a FIFO put there would hang the
    reader; a symlink could point anywhere).

    Raises:
        FileNotFoundError: no such file. OSError: it cannot be opened.
        StoreError: it is a symlink or not a regular file, or not a JSON object.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = f"{path} is damaged (a symbolic link, not a record)"
            raise StoreError(msg) from None
        raise
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            msg = f"{path} is damaged (not a regular file)"
            raise StoreError(msg)
        try:
            raw = json.load(f)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            msg = f"{path} is damaged ({'empty' if not st.st_size else 'not JSON'}: {exc!r})"
            raise StoreError(msg) from None
    if not isinstance(raw, dict):
        msg = f"{path} is damaged (not a JSON object)"
        raise StoreError(msg)
    return raw


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for an error message."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR,
             "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")
