# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d fsck [--repair]`: check every record and chunk, say what is damaged and whom it hurts.

Checked: image records (readable, name matches), blob records (readable, id is
the content id of the table), every blob an image names is present, every
chunk file hashes to its name, every local chunk of a named blob is present
(chunks with a remote range may be absent: they are fetched on READ), dedup
records, key entries, location records (readable, named by their content, for
a blob in the store with one range per chunk; each one an image names is there).

`--repair` quarantines damaged files (moved to quarantine/, kept for a look)
and drops stale key entries. A quarantined chunk or blob record is written
again when the same content arrives (build, import, add, or a READ with
write-through), since every write verifies what is already there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ondemand_d.errors import StoreError, UnknownName
from ondemand_d.store import durable
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import LOCATIONS
from ondemand_d.store.model import Image


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # image-record, blob-record, blob-missing, chunk-damaged, chunk-missing, ...
    path: str
    detail: str
    images: tuple[str, ...] = ()  # the images that read wrong or fail because of it
    repaired: str = ""  # what --repair did about it


@dataclass
class FsckReport:
    images: int = 0
    blobs: int = 0
    chunks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def affected(self) -> list[str]:
        return sorted({name for p in self.problems for name in p.images})


def fsck(store: LocalStore, *, repair: bool = False,
         progress: Callable[[str], None] | None = None) -> FsckReport:
    """Check the whole store; with `repair`, quarantine what is damaged."""
    say = progress or (lambda _msg: None)
    report = FsckReport()
    with store.writer_lock() if repair else _reader_lock(store.root):
        images, damaged = store.scan_images()
        report.images = len(images) + len(damaged)
        for d in damaged:
            done = f"{_quarantine(store, d.path)}; import, build or add it again" if repair else ""
            report.problems.append(Problem("image-record", str(d.path), d.error,
                                           (d.path.stem,), done))
        users: dict[str, set[str]] = defaultdict(set)  # blob id -> image names
        for image in images:
            for blob_id in image.blob_ids:
                users[blob_id].add(image.name)
        chunk_users: dict[str, set[str]] = defaultdict(set)  # digest -> image names
        local_needed: dict[str, set[str]] = defaultdict(set)  # digest -> images needing it here
        present = set(store.blob_ids())
        say(f"checking {len(present)} blob record(s)")
        for blob_id in sorted(present | set(users)):
            report.blobs += 1
            who = tuple(sorted(users.get(blob_id, ())))
            if blob_id not in present:
                report.problems.append(Problem("blob-missing", str(store.blob_path(blob_id)),
                                               "an image names this blob", who))
                continue
            try:
                blob = store.get_blob(blob_id)
            except StoreError as exc:
                done = _quarantine(store, store.blob_path(blob_id)) if repair else ""
                report.problems.append(Problem("blob-record", str(store.blob_path(blob_id)),
                                               str(exc), who, done))
                if done and who:
                    report.problems.append(Problem(
                        "blob-missing", str(store.blob_path(blob_id)),
                        "build, import or add the same content again to restore it", who))
                continue
            for chunk in blob.chunks:
                chunk_users[chunk.digest].update(who)
                if chunk.remote is None:
                    local_needed[chunk.digest].update(who)
        _check_locations(store, report, images, repair=repair)
        _check_chunks(store, report, chunk_users, local_needed, repair=repair, say=say)
        _check_dedup(store, report, repair=repair)
        _check_keys(store, report, repair=repair)
    return report


def _check_chunks(
    store: LocalStore,
    report: FsckReport,
    users: dict[str, set[str]],
    needed: dict[str, set[str]],
    *,
    repair: bool,
    say: Callable[[str], None],
) -> None:
    seen: set[str] = set()
    for sub in sorted((store.root / "chunks").iterdir()):
        for path in sorted(sub.iterdir()):
            report.chunks += 1
            seen.add(path.name)
            h = hashlib.sha256()
            try:
                with _open_regular(path) as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        report.bytes += len(block)
            except OSError as exc:
                detail = f"unreadable: {exc.strerror}"
            else:
                if h.hexdigest() == path.name and path.parent.name == path.name[:2]:
                    continue
                detail = f"content hashes to {h.hexdigest()}"
            done = _quarantine(store, path) if repair else ""
            report.problems.append(Problem("chunk-damaged", str(path), detail,
                                           tuple(sorted(users.get(path.name, ()))), done))
            seen.discard(path.name)
        if report.chunks % 1000 == 0:
            say(f"checked {report.chunks} chunk(s)")
    for digest in sorted(set(needed) - seen):
        report.problems.append(Problem(
            "chunk-missing", str(store.chunk_path(digest)),
            "a blob's local chunk is absent; build, import or add the same content again "
            "to restore it", tuple(sorted(needed[digest]))))


@contextlib.contextmanager
def _reader_lock(root: Path) -> Iterator[None]:
    """Keep writers out while checking, without writing: the lock file is only opened.

    A store on a read-only mount (or one this user cannot write) has no writers to keep
    out, and may have no lock file: fsck then reads it without a lock.
    """
    try:
        fd = os.open(root / "lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (a FIFO would hang a plain open).

    Raises:
        OSError: it cannot be opened, or is not a regular file (EINVAL, "not a regular file").
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return open(fd, "rb")  # noqa: SIM115 - the caller's with closes it


def _check_locations(store: LocalStore, report: FsckReport, images: list[Image], *,
                     repair: bool) -> None:
    """A bad location hurts each image naming it: their remote chunks fail (EIO), since
    an image never fetches from another image's location."""
    named: dict[str, set[str]] = defaultdict(set)  # location id -> images naming it
    for image in images:
        locations = image.extra.get(LOCATIONS)
        if isinstance(locations, dict):
            for location_id in locations.values():
                named[str(location_id)].add(image.name)
    folder = store.root / "locations"
    present = {p.stem for p in folder.glob("*.json")}
    for location_id in sorted(present | set(named)):
        path, who = folder / f"{location_id}.json", tuple(sorted(named.get(location_id, ())))
        if location_id not in present:
            report.problems.append(Problem("location-missing", str(path),
                                           "an image names this location; add it again", who))
            continue
        detail = _location_damage(store, location_id, report)
        if detail is None:
            continue
        done = _quarantine(store, path) if repair else ""
        report.problems.append(Problem("location-record", str(path), detail, who, done))
        if done and who:
            report.problems.append(Problem("location-missing", str(path),
                                           "add the image(s) again to restore it", who))


def _location_damage(store: LocalStore, location_id: str, report: FsckReport) -> str | None:
    """What is wrong with a location record, or None (also when its blob's record is the
    damaged one: that is reported, and the location is sound)."""
    try:
        location = store.get_location(location_id)
    except StoreError as exc:  # a name that is not a digest among them
        return str(exc)
    try:
        blob = store.get_blob(location.blob_id)
    except UnknownName:
        if any(p.kind == "blob-record" and p.path == str(store.blob_path(location.blob_id))
               for p in report.problems):
            return None
        return f"names blob {location.blob_id}, which is not in the store"
    except StoreError:
        return None
    if len(blob.chunks) != len(location.ranges):
        return (f"has {len(location.ranges)} range(s) but blob {location.blob_id} has "
                f"{len(blob.chunks)} chunk(s)")
    return None


def _check_dedup(store: LocalStore, report: FsckReport, *, repair: bool) -> None:
    for path in sorted((store.root / "dedup").glob("*.json")):
        try:
            raw = store.load_record(path)
            ok = raw.get("blob") == path.stem and isinstance(raw.get("extents"), list)
        except StoreError:
            ok = False
        if not ok:
            done = _quarantine(store, path) if repair else ""
            report.problems.append(Problem("dedup-record", str(path),
                                           "damaged (only costs dedup)", (), done))


def _check_keys(store: LocalStore, report: FsckReport, *, repair: bool) -> None:
    for key_dir in sorted((store.root / "keys").iterdir()):
        for entry in sorted(key_dir.iterdir()):
            key = store.key_entry_key(entry)
            try:
                image = store.get_image(entry.name)
            except StoreError:
                image = None
            if key is not None and image is not None and image.blob_for(key) is not None:
                continue
            done = ""
            if repair:
                durable.unlink(entry)
                done = "removed"
            report.problems.append(Problem("key-entry", str(entry),
                                           "stale (its image is gone or no longer lists the key)",
                                           (), done))


def _quarantine(store: LocalStore, path: Path) -> str:
    return f"quarantined to {store.quarantine(path)}"
