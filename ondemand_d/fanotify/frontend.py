# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end: one pre-content group, one file per blob, the mounts on them.

For each FAN_PRE_ACCESS event on a blob file the chunks that cover the range are
fetched (local store or registry, verified by the shared `ChunkFetcher`), written
whole through the file's fill fd, and the event is allowed; any failure denies it
with EIO. A reader therefore gets correct bytes or EIO, never a hole's zeros.

Here the events are answered and the mounts made and unmade. The blob files, written
only through fds opened before their mark, are `files`; those fds and the group fd go
to systemd's fd store or the fd holder (`fdstore`, `holder`), so a successor keeps the
marks and pending events alive; what it takes over or denies is `adoption`; the
directory a mount goes on is `mountpoint`.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ondemand_d.cachedir import CullResult
from ondemand_d.log import ms_since
from ondemand_d.errors import MountError, StoreError, UnknownName
from ondemand_d.fanotify import adoption, layout, sharing, syscalls, uapi
from ondemand_d.fanotify.blobfile import BlobFile, Pending
from ondemand_d.fanotify.counters import ALREADY_FILLED, EventCounters
from ondemand_d.fanotify.fdstore import FDSTORE_GROUP, FdStore, SystemdFdStore
from ondemand_d.fanotify.files import BlobFiles
from ondemand_d.fanotify.filler import ChunkFiller
from ondemand_d.fanotify.mountpoint import (
    current_options, is_mount_root, mount_table_name, open_mountpoint)
from ondemand_d.fill import MetadataWalkError, metadata_of
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.lease import Lease, gc_lock
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import image_location

log = structlog.get_logger()

READ_SIZE = 1 << 16  # events are 48 bytes: up to 1365 per read()


@dataclass
class Mount:
    record: layout.MountRecord
    files: tuple[BlobFile, ...]
    sharing: str = sharing.UNKNOWN  # "on" or "off: <reason>" (sharing.py)


class FanotifyFrontend:
    """The group fd, the blob files and the mounts of one daemon.

    Args:
        cache_dir: where `fanotify/` lives (not tmpfs).
        store: resolves images and blobs.
        fetcher: verified chunk bytes (shared with the fscache front end).
        executor: runs file writes.
        readahead: after an event, fill this many bytes that follow it.
        cache_max: bytes the blob files may hold (0: no limit); see `BlobFiles.make_room`.
        nosuid: mount nosuid,nodev (the default; False is the documented opt-out
            `mount_nosuid = false`, for images whose setuid files must work).
    """

    def __init__(
        self, cache_dir: Path, store: LocalStore, fetcher: ChunkFetcher, executor: Executor,
        *, readahead: int = 0, group: int | None = None, inherited: dict[str, int] | None = None,
        cache_max: int = 0, nosuid: bool = True, keep_dirs: tuple[Path, ...] = (),
        fdstore: FdStore | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.nosuid = nosuid
        #: Never mounted on, under or above: the daemon's own directories.
        self.keep_dirs = (cache_dir.absolute(), *keep_dirs)
        self.store = store
        self.fetcher = fetcher
        self._executor = executor
        self.cache_max = cache_max
        self.filler = ChunkFiller(fetcher, executor, readahead=readahead, spawn=self._spawn,
                                  make_room=self._make_room if cache_max else None)
        self.adopted = group is not None
        self.fdstore = fdstore or SystemdFdStore()
        self.group = group if group is not None else syscalls.fanotify_init()
        if group is None:
            self.fdstore.store(self.group, FDSTORE_GROUP)
        self._inherited = dict(inherited or {})
        self.blob_files = BlobFiles(cache_dir, self.group, self.fdstore, adopted=self.adopted,
                                    mounted=self._mounted, answer=self._answer)
        self.mounts: dict[str, Mount] = {}
        self._seq = 0
        self._closing: set[BlobFile] = set()  # files of mounts being unmounted: events get EIO
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lease = Lease(store.root)
        self.counters = EventCounters()
        #: Gets each event's line whatever the log level (the control socket's `trace`).
        self.on_answer: Callable[[dict[str, Any]], None] | None = None
        #: Mounts a previous instance left that this one could not serve (fail closed).
        self.denied: list[dict[str, Any]] = []

    @property
    def files(self) -> dict[tuple[str, str], BlobFile]:
        """The blob files known, by (domain, blob id)."""
        return self.blob_files.files

    # -- start and stop -------------------------------------------------------------

    def start(self) -> None:
        """Adopt what a previous instance left, answer its orphaned events, start reading."""
        self._loop = asyncio.get_running_loop()
        self._adopt()
        if self.adopted:
            self.counters.orphans = adoption.answer_orphans(self.group)
        self._loop.add_reader(self.group, self._on_readable)
        self._on_readable()

    def _adopt(self) -> None:
        """Take over the files and the mounts of the previous instance that are still up."""
        kept, denied = adoption.adopt(self.blob_files, self.store, self._inherited)
        for record, files in kept:
            self.mounts[record.mountpoint] = Mount(record, files)
        self.denied += denied
        self._update_lease()

    async def stop(self, timeout: float) -> None:
        """Unmount every mount (clean stop), answer what is pending, close the group.

        A mount still in use cannot be unmounted: its blobs are filled whole first and
        it is then detached, so no reader of it ever sees a hole once the group is gone.
        """
        for mountpoint in list(self.mounts):
            try:
                await self.umount(mountpoint, lazy=False, wait=0.5)
            except Exception:  # noqa: BLE001 - busy, or anything: fill it whole, then detach
                mount = self.mounts[mountpoint]
                log.warning("fanotify_mount_busy", mountpoint=mountpoint,
                            consequence="filling its blobs whole, then detaching it")
                try:
                    await asyncio.wait_for(self.filler.fill_all(mount.files), timeout)
                except (TimeoutError, StoreError, OSError) as exc:
                    log.error("fanotify_fill_failed", mountpoint=mountpoint, error=str(exc),
                              consequence="readers of this mount may read zeros once the "
                              "daemon is gone: unmount it")
                try:
                    await self.umount(mountpoint, lazy=True)
                except Exception as exc:  # noqa: BLE001 - stopping goes on
                    log.error("fanotify_umount_failed", mountpoint=mountpoint, error=repr(exc))
        if self._loop is not None:
            self._loop.remove_reader(self.group)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for file in self.files.values():
            for pending in list(file.pending):
                self._answer(pending, errno.EIO, "stopping")
            os.close(file.fd)
        os.close(self.group)
        self.fdstore.close(clean=True)
        self._lease.close()

    # -- events ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        while True:
            try:
                buf = os.read(self.group, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("fanotify_read_failed", errno=exc.errno, error=exc.strerror)
                return
            try:
                events = uapi.parse(buf)
            except uapi.FanotifyProtocolError as exc:
                log.error("malformed_message", frontend="fanotify", error=str(exc),
                          raw=buf[:64].hex())
                continue
            for event in events:
                self._dispatch(event)

    def _dispatch(self, event: uapi.Event) -> None:
        self.counters.events += 1
        self._seq += 1
        if event.fd < 0:  # an overflow: nothing to answer (the queue is unlimited)
            log.error("fanotify_overflow", mask=event.mask)
            return
        file: BlobFile | None = None
        with contextlib.suppress(OSError):
            st = os.fstat(event.fd)
            file = self.blob_files.by_ino.get((st.st_dev, st.st_ino))
        pending = Pending(self._seq, event, file, time.perf_counter())
        if file is None or not event.range:
            self._answer(pending, errno.EIO, "unknown file" if file is None else "no range")
            return
        if file in self._closing:
            self._answer(pending, errno.EIO, "unmounting")
            return
        file.pending.add(pending)
        covered = file.blob.chunks_for(event.offset, event.count)
        first = bisect.bisect_right(file.starts, covered[0].offset) - 1 if covered else 0
        pending.chunks = tuple(range(first, first + len(covered)))
        if not file.missing(pending.chunks):
            self._answer(pending, 0, "", source=ALREADY_FILLED)  # no task: the common warm case
            self.filler.start_readahead(file, pending.chunks)  # keep ahead of a sequential reader
            return
        self._spawn(self._serve(pending))

    async def _serve(self, pending: Pending) -> None:
        file = pending.file
        assert file is not None
        try:
            written, source = await self.filler.ensure(file, pending.chunks)
        except (StoreError, OSError) as exc:
            self._answer(pending, errno.EIO, str(exc) or repr(exc), error_type=type(exc).__name__)
        except asyncio.CancelledError:
            self._answer(pending, errno.EIO, "cancelled")
            raise
        except Exception as exc:
            self._answer(pending, errno.EIO, repr(exc), error_type=type(exc).__name__)
            raise
        else:
            self._answer(pending, 0, "", written=written, source=source)
            self.filler.start_readahead(file, pending.chunks)

    def _answer(
        self, pending: Pending, error: int, reason: str, *, written: int = 0,
        source: str = "", error_type: str = "",
    ) -> None:
        """Answer the event once, close its fd, count it, and log the READ's one line.

        The line of a range that was already filled is at debug: those are most events
        (96% of the lines of a warm tree read), beyond journald's default rate limit.
        """
        if pending.answered:
            return
        pending.answered = True
        event = pending.event
        try:
            os.write(self.group, uapi.response(event.fd, error))
        except OSError as exc:
            log.error("fanotify_answer_failed", msg_id=pending.seq, errno=exc.errno)
        with contextlib.suppress(OSError):
            os.close(event.fd)
        file = pending.file
        if file is not None:
            file.pending.discard(pending)
        fields: dict[str, Any] = {
            "op": "READ", "frontend": "fanotify", "msg_id": pending.seq, "object_id": None,
            "key": f"{file.domain}/{file.blob.blob_id[:12]}" if file else None,
            "blob": file.blob.blob_id if file else None, "off": event.offset,
            "len": event.count, "chunks": len(pending.chunks), "pid": event.pid,
            "duration_ms": ms_since(pending.start),
        }
        if error == 0:
            fields.update(bytes=written, source=source, outcome="ok")
            self.counters.answered(source, "ok", written)
            (log.debug if source == ALREADY_FILLED else log.info)("read_completed", **fields)
        else:
            fields.update(bytes=0, outcome="eio", error=reason, error_type=error_type or "Denied")
            self.counters.answered(source, "eio", 0, fields["error_type"])
            log.warning("read_completed", **fields)
        if self.on_answer is not None:
            self.on_answer({"event": "read_completed", **fields})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("task_failed", frontend="fanotify", error=repr(exc), exc_info=exc)

    # -- mounts ---------------------------------------------------------------------

    async def mount(self, image_name: str, mountpoint: str, domain: str | None = None
                    ) -> dict[str, Any]:
        """Lay out the image's files, fill its bootstrap's metadata, mount it (file-backed
        EROFS). A failure takes back the files and fds it laid out.

        The mountpoint is resolved once, with no symlink allowed on the way, into an O_PATH
        fd; it is checked through that fd and the mount is made on that fd.

        Raises:
            MountError: the image, the domain or the mountpoint is not usable, or mount(2)
                failed; the message says which and what to do.
        """
        target_fd, target = open_mountpoint(mountpoint, self.keep_dirs)
        try:
            return await self._mount(image_name, target_fd, target, domain)
        finally:
            os.close(target_fd)

    async def _mount(self, image_name: str, target_fd: int, target: str, domain: str | None
                     ) -> dict[str, Any]:
        start = time.perf_counter()
        if target in self.mounts or is_mount_root(target_fd):
            msg = f"{target} is already a mount point: umount it first or pick another directory"
            raise MountError(msg)
        asked = domain  # page-cache sharing only where a domain was named
        try:
            domain = layout.check_domain(domain or image_name)
        except ValueError as exc:
            raise MountError(str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            with gc_lock(self.store.root, exclusive=False):
                image = self.store.get_image(image_name)
                # Its own locations: a blob file this domain has already uses its first mount's.
                blobs = [image_location(self.store, image, self.store.get_blob(b))
                         for b in image.blob_ids]
                self._lease.keep(self._leased() | {b.blob_id for b in blobs})
        except UnknownName as exc:
            raise MountError(f"{exc}: add, build or import it first") from None
        except StoreError as exc:
            raise MountError(f"image {image_name!r} cannot be read from the store: {exc}") from None
        # This mount's new files: what a failure takes back (not files another mount, under
        # way or done, laid out or uses).
        new = {(domain, b.blob_id) for b in blobs} - set(self.files)
        laying = [layout.blob_path(self.cache_dir, domain, b.blob_id) for b in blobs]
        self.blob_files.laying_out += laying
        try:
            files = tuple(self.blob_files.file(domain, b) for b in blobs)
        except OSError as exc:
            self._discard_new(new, laying)
            msg = f"cannot lay out the files of {image_name!r} in {layout.root(self.cache_dir)}: "
            raise MountError(msg + (exc.strerror or str(exc))) from exc
        try:
            await self._fill_metadata(image_name, files[0])
        except MountError:
            self._discard_new(new, laying)
            raise
        except (StoreError, OSError) as exc:
            self._discard_new(new, laying)
            msg = f"the bootstrap of {image_name!r} could not be filled: {exc}"
            raise MountError(msg) from exc
        layout.mount_options([f.path for f in files[1:]])  # the same paths mountinfo can show
        share = await sharing.decide(self.fetcher, files[0].blob, [f.blob for f in files[1:]],
                                     domain if asked else None)
        try:
            await loop.run_in_executor(self._executor, functools.partial(
                syscalls.mount_erofs, str(files[0].path), target_fd,
                [str(f.path) for f in files[1:]], nosuid=self.nosuid, options=share.options))
        except OSError as exc:
            self._discard_new(new, laying)
            hint = {errno.EINVAL: "the image is not a valid EROFS image for this kernel "
                    "(see dmesg)", errno.ENODEV: "the kernel has no EROFS (CONFIG_EROFS_FS)",
                    errno.ENOTDIR: "the mountpoint is not a directory"}.get(
                        exc.errno or 0, exc.strerror or "")
            raise MountError(f"mounting {image_name!r} on {target} failed: {hint}") from exc
        record = layout.MountRecord(target, image.name, domain, image.blob_ids)
        self.mounts[target] = Mount(record, files, sharing.confirm(share, target).status)
        self.blob_files.done_laying_out(laying)
        self._save()
        log.info("fanotify_mounted", frontend="fanotify", image=image.name, mountpoint=target,
                 domain=domain, blobs=len(files), options=current_options(target),
                 sharing=self.mounts[target].sharing,
                 nosuid=self.nosuid, duration_ms=ms_since(start),
                 **({} if self.nosuid else {"warning": "mount_nosuid = false: setuid files "
                                            "and device nodes of this image take effect"}))
        return self.mount_view(self.mounts[target])

    async def _fill_metadata(self, image_name: str, bootstrap: BlobFile) -> None:
        """Fill the chunks of the bootstrap that hold EROFS metadata, and only those.

        EROFS reads metadata without raising events (fanotify.md rule 1), so every byte of it
        must be there before mount; file data in the bootstrap (a plain image) is filled on
        demand like any blob's. A bootstrap the walk cannot follow is refused, never filled
        whole: it could declare any size.
        """
        loop = asyncio.get_running_loop()
        try:
            ranges = await metadata_of(self.fetcher, bootstrap.blob, functools.partial(
                loop.run_in_executor, self._executor))
        except MetadataWalkError as exc:
            msg = (f"the bootstrap of {image_name!r} is not an EROFS image whose metadata this "
                   f"daemon can find ({exc}), and EROFS reads metadata without fanotify events: "
                   "it is not mounted (rebuild it with ondemand-d build or mkfs.erofs)")
            raise MountError(msg) from None
        blob = bootstrap.blob
        chunks = {bisect.bisect_right(bootstrap.starts, c.offset) - 1
                  for start, end in ranges for c in blob.chunks_for(start, end - start)}
        await self.filler.ensure(bootstrap, sorted(chunks))

    def _discard_new(self, new: set[tuple[str, str]], laying: list[Path]) -> None:
        """Take back what a failed mount laid out: the blob files it created (not those of
        other mounts), their fill fds (here and in the fd store), and their lease."""
        self.blob_files.discard_new(new, laying)
        self._update_lease()

    def cull(self, blob_ids: set[str] | None) -> list[CullResult]:
        """Remove the blob files of `blob_ids` (all, for None) that no mount uses."""
        return self.blob_files.cull(blob_ids)

    def _make_room(self, need: int) -> None:
        """Before a fill of `need` bytes: see `BlobFiles.make_room`."""
        self.blob_files.make_room(need, self.cache_max, self.filler.in_flight_bytes)

    def _mounted(self) -> set[Path]:
        return {f.path for m in self.mounts.values() for f in m.files}

    async def umount(self, mountpoint: str, *, lazy: bool = False, wait: float = 2.0
                     ) -> dict[str, Any]:
        """Answer the blocked readers of the mount's own blobs with EIO, then unmount.

        Raises:
            MountError: not a mount of this daemon, or still in use (pass lazy to detach).
        """
        target = mount_table_name(mountpoint)
        mount = self.mounts.get(target)
        if mount is None:
            msg = f"{target} is not mounted by this daemon (see `ondemand-d status`)"
            raise MountError(msg)
        shared = {f for m in self.mounts.values() if m is not mount for f in m.files}
        # Files no other mount reads: their readers (and EROFS's retries) get EIO from now.
        own = {f for f in mount.files if f not in shared}
        self._closing |= own
        try:
            return await self._umount(mount, target, own, lazy=lazy, wait=wait)
        finally:
            self._closing -= own

    async def _umount(self, mount: Mount, target: str, own: set[BlobFile], *, lazy: bool,
                      wait: float) -> dict[str, Any]:
        denied = 0
        for file in own:
            for pending in list(file.pending):
                self._answer(pending, errno.EIO, "unmounting")
                denied += 1
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        detached = False
        while True:
            try:
                await loop.run_in_executor(self._executor, syscalls.umount, target)
                break
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # not mounted any more
                    break
                if exc.errno != errno.EBUSY:
                    raise MountError(f"umount {target} failed: {exc.strerror}") from exc
                if lazy:
                    await loop.run_in_executor(self._executor, functools.partial(
                        syscalls.umount, target, detach=True))
                    detached = True
                    break
                if time.monotonic() >= deadline:
                    msg = (f"{target} is in use (a process has a file open there): close it, "
                           "or umount --lazy to detach it now")
                    raise MountError(msg) from exc
                await asyncio.sleep(0.05)
        del self.mounts[target]
        self._save()
        released = 0
        if not detached:
            # Nothing reads these files any more: their fds leave (here and the fd store);
            # the files stay as cache until cull, gc or cache_max removes them. A detached
            # mount may still be read, so its files stay open and marked.
            for file in own:
                if file.filling:  # a fill still writes through the fd (a stalled fetch)
                    self._spawn(self.blob_files.release_when_filled(file))
                elif self.blob_files.release_unused(file):
                    released += 1
        self._update_lease()
        log.info("fanotify_unmounted", frontend="fanotify", image=mount.record.image,
                 mountpoint=target, readers_answered=denied, lazy=lazy,
                 files_released=released)
        return {"mountpoint": target, "image": mount.record.image, "readers_answered": denied}

    def mount_view(self, mount: Mount) -> dict[str, Any]:
        return {
            "mountpoint": mount.record.mountpoint, "image": mount.record.image,
            "domain": mount.record.domain, "options": current_options(mount.record.mountpoint),
            "sharing": mount.sharing,
            "blobs": [{"blob": f.blob.blob_id, "role": "bootstrap" if i == 0 else "data",
                       "path": str(f.path), "size": f.blob.size, "filled_bytes": f.filled_bytes,
                       "pending": len(f.pending)}
                      for i, f in enumerate(mount.files)],
        }

    def status(self) -> dict[str, Any]:
        holder = getattr(self.fdstore, "pid", None)
        return {"adopted": self.adopted, "nosuid": self.nosuid, "denied_mounts": self.denied,
                "fd_store": "systemd" if holder is None else "holder", "holder_pid": holder,
                "mounts": [self.mount_view(m)
                                                    for m in self.mounts.values()],
                "files": len(self.files), **self.counters.as_dict(),
                "bytes_filled": self.filler.bytes_filled}

    def _leased(self) -> set[str]:
        return {f.blob.blob_id for m in self.mounts.values() for f in m.files}

    def _update_lease(self) -> None:
        self._lease.keep(self._leased())

    def _save(self) -> None:
        layout.save_mounts(self.cache_dir, [m.record for m in self.mounts.values()])

