# SPDX-License-Identifier: Apache-2.0
"""The blob files of one group: laid out, adopted, released, removed, culled, room made.

A file is written only through its fill fd, opened *before* the file is marked: the
kernel decides at open time whether an fd raises pre-content events, and a write
through one that does would wait for this daemon's own answer. So a fill fd goes to
the fd store with the group, and a file no mount reads loses its mark before its fd.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from ondemand_d.cachedir import CullResult
from ondemand_d.fanotify import cachelimit, layout, syscalls
from ondemand_d.fanotify.blobfile import BlobFile, Pending, filled_chunks
from ondemand_d.fanotify.fdstore import FdStore, fdstore_name
from ondemand_d.store.model import Blob

log = structlog.get_logger()


class BlobFiles:
    """The blob files of one group, known by (domain, blob id) and by inode.

    Args:
        cache_dir: where `fanotify/` lives.
        group: the fanotify group whose marks the files bear.
        fdstore: keeps the fill fds across a crash.
        adopted: the group is a previous instance's (its marks may be on files on disk).
        mounted: the paths of the files that mounts read now.
        answer: answers a pending event (a removed file's readers get EIO).
    """

    def __init__(self, cache_dir: Path, group: int, fdstore: FdStore, *, adopted: bool,
                 mounted: Callable[[], set[Path]],
                 answer: Callable[[Pending, int, str], None]) -> None:
        self.cache_dir = cache_dir
        self.group = group
        self.fdstore = fdstore
        self.adopted = adopted
        self._mounted = mounted
        self._answer = answer
        self.files: dict[tuple[str, str], BlobFile] = {}
        self.by_ino: dict[tuple[int, int], BlobFile] = {}
        self.laying_out: list[Path] = []  # files of mounts under way (one entry each)

    def file(self, domain: str, blob: Blob) -> BlobFile:
        """The blob's file in `domain`: known, or created sparse, opened, then marked."""
        layout.check_domain(domain)
        known = self.files.get((domain, blob.blob_id))
        if known is not None:
            return known
        path = layout.blob_path(self.cache_dir, domain, blob.blob_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.adopted and path.exists():
            # The previous instance's mark may still be on it (our group lives on):
            # an fd opened now would raise events on our own writes. Start afresh.
            path.unlink()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != blob.size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, blob.size)
            syscalls.mark_fd(self.group, fd)  # after the open: this fd raises no events
        except BaseException:
            os.close(fd)
            raise
        self.fdstore.store(fd, fdstore_name(path))
        return self.add(domain, blob, path, fd)

    def add(self, domain: str, blob: Blob, path: Path, fd: int) -> BlobFile:
        st = os.fstat(fd)
        if st.st_size != blob.size:
            msg = f"{path} has {st.st_size} bytes, blob {blob.blob_id} has {blob.size}"
            raise ValueError(msg)
        file = BlobFile(domain, blob, path, fd, (st.st_dev, st.st_ino), filled_chunks(fd, blob))
        self.files[(domain, blob.blob_id)] = file
        self.by_ino[file.ino] = file
        return file

    def discard_new(self, new: set[tuple[str, str]], laying: list[Path]) -> None:
        """Take back what a failed mount laid out: the blob files it created (not those of
        other mounts), their fill fds (here and in the fd store)."""
        self.done_laying_out(laying)
        used = self._mounted() | set(self.laying_out)
        for key in new:
            file = self.files.get(key)
            if file is not None and file.path not in used:
                self.remove(file.path)

    def done_laying_out(self, laying: list[Path]) -> None:
        for path in laying:
            self.laying_out.remove(path)

    def remove(self, path: Path) -> None:
        """Close a blob file's fill fd (here and in the fd store) and delete the file."""
        for key, file in list(self.files.items()):
            if file.path == path:
                del self.files[key]
                self.by_ino.pop(file.ino, None)
                for pending in list(file.pending):
                    self._answer(pending, errno.EIO, "blob file removed")
                self.fdstore.remove(fdstore_name(file.path))
                os.close(file.fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def release(self, file: BlobFile) -> None:
        """Forget a blob file no mount reads: unmark it, drop and close its fill fd.

        The mark goes first: a later mount opens the file again, and an fd opened while
        our mark is on it would raise events on our own writes. What is filled stays.
        """
        if file.pending or file.filling:
            return  # still being served (a fill under way): the next umount or stop does it
        with contextlib.suppress(OSError):
            syscalls.mark_fd(self.group, file.fd, remove=True)
        del self.files[(file.domain, file.blob.blob_id)]
        self.by_ino.pop(file.ino, None)
        self.fdstore.remove(fdstore_name(file.path))
        os.close(file.fd)

    def release_unused(self, file: BlobFile) -> bool:
        """Release `file` unless a mount (done or under way) uses it again."""
        if file.path in self.busy() or self.files.get(
                (file.domain, file.blob.blob_id)) is not file:
            return False
        self.release(file)
        return True

    async def release_when_filled(self, file: BlobFile) -> None:
        while file.filling:
            await asyncio.wait(list(file.filling.values()))
        self.release_unused(file)

    def busy(self) -> set[Path]:
        """Blob files that must stay: a mount's, a mount's under way, or being filled."""
        return self._mounted() | set(self.laying_out) | {
            f.path for f in self.files.values() if f.filling or f.pending}

    def cull(self, blob_ids: set[str] | None) -> list[CullResult]:
        """Remove the blob files of `blob_ids` (all, for None) that no mount uses.

        Returns one result per file: culled (removed, its allocated bytes freed) or in_use.
        """
        busy = self.busy()
        results = []
        root = layout.root(self.cache_dir)
        for file in cachelimit.scan(root):
            if blob_ids is not None and file.path.name not in blob_ids:
                continue
            if file.path in busy:
                results.append(CullResult(file.path, file.path.name, "in_use", file.allocated))
                continue
            self.remove(file.path)
            results.append(CullResult(file.path, file.path.name, "culled", file.allocated))
            log.info("cache_file_removed", frontend="fanotify", path=str(file.path),
                     bytes=file.allocated, reason="cull")
        for domain in {r.path.parent for r in results if r.outcome == "culled"}:
            with contextlib.suppress(OSError):  # not empty: another blob's file is there
                domain.rmdir()
        return results

    def make_room(self, need: int, cache_max: int, in_flight: int) -> None:
        """Before a fill of `need` bytes (`in_flight` more claimed by fills under way): under
        cache_max, else blob files of no current mount removed (least recently used first),
        else OSError(ENOSPC): its reader gets EIO."""
        files = cachelimit.scan(layout.root(self.cache_dir))
        used = sum(f.allocated for f in files) + in_flight
        if used + need <= cache_max:
            return
        busy = self.busy()
        for victim in cachelimit.victims(files, busy, used + need - cache_max):
            self.remove(victim.path)
            used -= victim.allocated
            log.info("cache_file_removed", frontend="fanotify", path=str(victim.path),
                     bytes=victim.allocated, reason="cache_max")
        if used + need > cache_max:
            log.warning("cache_full", frontend="fanotify", used=used, need=need,
                        cache_max=cache_max)
            msg = (f"cache full: {used} bytes in use and {need} more needed, above cache_max "
                   f"{cache_max}")
            raise OSError(errno.ENOSPC, msg)
