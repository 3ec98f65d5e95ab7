# SPDX-License-Identifier: Apache-2.0
"""What a successor takes over from the instance before it, and what it denies.

The files handed over in the fd store are adopted, and the mounts on them that are
still up; a mount this instance cannot serve is denied and detached (fail closed),
never left to read holes as zeros. The events the dead instance read and never
answered (orphans) get EIO, which EROFS retries as new events.
"""
from __future__ import annotations

import errno
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from ondemand_d.errors import StoreError
from ondemand_d.fanotify import layout, syscalls, uapi
from ondemand_d.fanotify.blobfile import BlobFile
from ondemand_d.fanotify.fdstore import FDSTORE_FILE_PREFIX
from ondemand_d.fanotify.files import BlobFiles
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import locate

log = structlog.get_logger()

#: Orphaned events (read by a dead instance, never answered) are found by fd number.
ORPHAN_FD_LIMIT = 1 << 16

Adopted = tuple[layout.MountRecord, tuple[BlobFile, ...]]


def adopt(blob_files: BlobFiles, store: LocalStore, inherited: Mapping[str, int]
          ) -> tuple[list[Adopted], list[dict[str, Any]]]:
    """Take over the files and the mounts of the previous instance that are still up.

    Returns the mounts adopted, with their files, and the mounts denied (why, detached).
    """
    cache_dir = blob_files.cache_dir
    # A blob's file in a domain fetches from the first mount's image that uses it.
    first_user: dict[tuple[str, str], str] = {}
    for record in layout.load_mounts(cache_dir):
        for b in record.blobs:
            first_user.setdefault((record.domain, b), record.image)
    lost: dict[tuple[str, str], str] = {}  # (domain, blob id) -> why its file was dropped
    for name, fd in inherited.items():
        if not name.startswith(FDSTORE_FILE_PREFIX):
            continue
        path = Path("?")
        try:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            domain, blob_id = path.parent.name, path.name
            user = first_user.get((domain, blob_id))
            blob = locate(store, store.get_blob(blob_id), (user,) if user else ())
            blob_files.add(domain, blob, path, fd)
        except (OSError, StoreError, ValueError) as exc:
            log.warning("fanotify_file_not_adopted", fd=fd, error=str(exc))
            lost[(path.parent.name, path.name)] = str(exc)
            os.close(fd)
    denied: list[dict[str, Any]] = []
    denied_files: set[tuple[str, str]] = set()  # (domain, blob id) of the denied mounts

    def fail_closed(record: layout.MountRecord, reason: str) -> None:
        denied_files.update((record.domain, b) for b in record.blobs)
        denied.append(deny(blob_files, record, reason))

    up = layout.current_mounts()
    kept: list[Adopted] = []
    for record in layout.load_mounts(cache_dir):
        fstype, source = up.get(record.mountpoint, ("", ""))
        if fstype != "erofs" or not record.blobs:
            continue
        try:
            if blob_files.adopted:  # our group lives on: only the files handed over are safe
                missing = [b for b in record.blobs if (record.domain, b) not in blob_files.files]
                if missing:
                    why = lost.get((record.domain, missing[0]), "it was not handed over")
                    msg = f"the file of blob {missing[0][:12]} cannot be served: {why}"
                    raise ValueError(msg)
            files = tuple(blob_files.file(record.domain,
                                          locate(store, store.get_blob(b), (record.image,)))
                          for b in record.blobs)
            if not blob_files.adopted:
                check_gap(files)
        except Exception as exc:  # noqa: BLE001 - whatever it is, fail closed
            fail_closed(record, str(exc) or repr(exc))
            continue
        kept.append((record, files))
        log.info("fanotify_mount_adopted", mountpoint=record.mountpoint, image=record.image,
                 domain=record.domain, source=source,
                 filled_bytes=sum(f.filled_bytes for f in files))
    done = {r.mountpoint for r, _ in kept} | {d["mountpoint"] for d in denied}
    for record in unrecorded(cache_dir, up, done):
        fail_closed(record, "it is not in fanotify/mounts.json (lost or damaged): "
                    "this instance does not know its image")
    if layout.root(cache_dir).is_dir():
        layout.save_mounts(cache_dir, [r for r, _ in kept])
    # Files handed over for mounts that are gone (unmounted before the crash) are only
    # cache now: their fds leave this process and the fd store. A denied mount's files
    # stay marked and known: it may still be read until its readers close it.
    for key, file in list(blob_files.files.items()):
        if key not in first_user and key not in denied_files:
            blob_files.release(file)
    return kept, denied


def unrecorded(cache_dir: Path, up: dict[str, tuple[str, str]], done: set[str]
               ) -> list[layout.MountRecord]:
    """The mounts on our files that mounts.json does not name (lost or damaged).

    `done` are the mountpoints already adopted or denied.
    """
    ours = str(layout.root(cache_dir).absolute()) + "/"
    records = []
    for mountpoint, (fstype, source) in up.items():
        if fstype != "erofs" or not source.startswith(ours) or mountpoint in done:
            continue
        path = Path(source)
        try:
            records.append(layout.MountRecord(mountpoint, "?", layout.check_domain(
                path.parent.name), (path.name,)))
        except ValueError:
            continue
    return records


def deny(blob_files: BlobFiles, record: layout.MountRecord, reason: str) -> dict[str, Any]:
    """Fail closed on a mount this instance cannot serve: EIO for its readers, detach it.

    Its blob files get this group's mark (a file this instance does not know is
    answered EIO), so a reader of a range nobody filled gets EIO, never a hole's
    zeros; the lazy umount keeps anyone from opening a file there again.

    Returns what `status` shows of it: mountpoint, image, domain, reason, detached.
    """
    marked = 0
    for blob_id in record.blobs:
        if (record.domain, blob_id) in blob_files.files:
            continue  # known: its events are served, with verified bytes
        path = layout.blob_path(blob_files.cache_dir, record.domain, blob_id)
        try:
            syscalls.mark_path(blob_files.group, str(path))
            marked += 1
        except OSError as exc:
            log.error("fanotify_deny_mark_failed", mountpoint=record.mountpoint,
                      path=str(path), error=exc.strerror)
    try:
        syscalls.umount(record.mountpoint, detach=True)
        detached = True
    except OSError as exc:
        log.error("fanotify_detach_failed", mountpoint=record.mountpoint,
                  error=exc.strerror)
        detached = False
    log.error("fanotify_mount_denied", mountpoint=record.mountpoint, image=record.image,
              domain=record.domain, reason=reason, files_denied=marked, detached=detached,
              consequence="not adopted: reads of its unfilled ranges get EIO, and it is "
              "detached; mount the image again")
    return {"mountpoint": record.mountpoint, "image": record.image,
            "domain": record.domain, "reason": reason, "detached": detached}


def answer_orphans(group: int) -> int:
    """Deny the events a dead instance read and never answered (found by fd number).

    Their readers get EIO for that read, which EROFS retries page by page: those
    retries are new events, which this instance fills. Writing an answer for a
    number that is no pending event fails with ENOENT and changes nothing.

    Returns how many were answered.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = min(soft if soft > 0 else ORPHAN_FD_LIMIT, ORPHAN_FD_LIMIT)
    answered = 0
    for fd in range(limit):
        try:
            os.write(group, uapi.response(fd, errno.EIO))
            answered += 1
        except OSError:
            continue
    log.info("fanotify_orphans_answered", events=answered, probed=limit)
    return answered


def check_gap(files: tuple[BlobFile, ...]) -> None:
    """Refuse a mount whose group died with the previous instance while a hole was left.

    Between that death and this start nobody answered its events: the kernel allowed
    them, so a read of a hole returned zeros that may still sit in the page cache. A
    mount whose files are whole had no hole to read (nothing fills a file while no
    daemon runs), so it is safe to serve; any other is not.

    Raises:
        ValueError: which blob has holes, and why that matters.
    """
    for file in files:
        if not all(file.filled):
            msg = (f"blob {file.blob.blob_id[:12]} was not filled whole when the previous "
                   "instance's fanotify group closed (no fd store or holder kept it): its "
                   "holes may have been read as zeros")
            raise ValueError(msg)
