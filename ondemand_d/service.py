# SPDX-License-Identifier: Apache-2.0
"""The running daemon: reads the device, feeds `protocol.Objects`, carries out its actions.

Nothing is decided here. A message from the kernel becomes an event of the
state machine; each action it returns is run (a lookup in the I/O pool, a
`copen`, a fill through `fill.FillEngine`, a background write, a close), and
the end of each piece of work goes back to the machine as the next event. The
device is read for as long as the machine is `accepting`: READs wait in the
machine for a slot of their source, never in the kernel's queue, so a stalled
registry holds back only READs of that registry.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ondemand_d import protocol, wire
from ondemand_d.log import ms_since
from ondemand_d._native import Backend
from ondemand_d.errors import BadKey, ProtocolError, StoreError, UnknownName
from ondemand_d.fill import CacheLimit, FillEngine, FillReport, Progress
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.limits import DEFAULT_MAX_BOOTSTRAP
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import locate
from ondemand_d.store.model import Blob
from ondemand_d.volume_images import VolumeImages

log = structlog.get_logger()


class DeviceLike(Protocol):
    """What the service needs of the devnode (the real Device or a test's fake)."""

    fd: int

    def read_message(self) -> bytes | None: ...

    def copen(self, msg_id: int, size_or_errno: int) -> None: ...


@dataclass
class Counters:
    opens: int = 0
    opens_failed: int = 0
    reads: int = 0
    reads_failed: int = 0
    bytes_written: int = 0
    closes: int = 0
    malformed: int = 0
    unexpected: int = 0


class Service:
    """One bound device, one store, the state machine and the work it asks for.

    Args:
        concurrency: READs of one source (the local store, or one registry)
            filled at once.
        prefill_bootstrap: write a bootstrap's holes right after its OPEN.
        prefetch: write a data blob's holes right after its OPEN.
        readahead: bytes written past each READ before the kernel asks.
        cache_limit: cache_max: prefill, prefetch and readahead stop before passing it.
        max_bootstrap: the largest bootstrap prefilled whole when its metadata walk gives up.
        volumes: the images each volume mounted, in order (kept across restarts
            when it has a path); it decides where shared data blobs are fetched from.
    """

    def __init__(  # noqa: PLR0913 - collaborators arrive as parameters
        self,
        device: DeviceLike,
        store: LocalStore,
        fetcher: ChunkFetcher,
        backend: Backend,
        executor: ThreadPoolExecutor,
        *,
        concurrency: int = 64,
        prefill_bootstrap: bool = True,
        prefetch: bool = False,
        readahead: int = 0,
        cache_limit: CacheLimit | None = None,
        volumes: VolumeImages | None = None,
        max_bootstrap: int = DEFAULT_MAX_BOOTSTRAP,
    ) -> None:
        self.device = device
        self.store = store
        self.fetcher = fetcher
        self.backend = backend
        self.objects = protocol.Objects(limit=concurrency, readahead=readahead)
        self.counters = Counters()
        debug = structlog.get_logger().is_enabled_for(logging.DEBUG)
        self.engine = FillEngine(fetcher, backend, executor,
                                 io_jobs=getattr(executor, "_max_workers", 4),
                                 log=log if debug else None, cache_limit=cache_limit,
                                 whole_prefill_cap=max_bootstrap)
        self._executor = executor
        self._prefill_bootstrap = prefill_bootstrap
        self._prefetch = prefetch
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: dict[int, asyncio.Task[None]] = {}  # fd -> its background write
        self._reading = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.volumes = volumes or VolumeImages()

    @property
    def reads(self) -> dict[int, Any]:
        """msg_id -> READ being filled (for `inflight`)."""
        return self.engine.reads

    # -- reading the device --------------------------------------------------------------

    def start(self) -> None:
        """Start reading the device on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._resume()
        self._on_readable()  # requests queued before we started raise no new edge

    def _resume(self) -> None:
        if not self._reading and not self._stopping and self._loop is not None:
            self._loop.add_reader(self.device.fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.device.fd)
            self._reading = False

    def _on_readable(self) -> None:
        """Read messages until the kernel has none queued or the machine holds enough."""
        while not self._stopping:
            if not self.objects.accepting:
                self._pause()
                return
            try:
                buf = self.device.read_message()
            except OSError as exc:
                # EMFILE/ENOMEM/EFAULT: the kernel failed that request itself.
                log.error("device_read_failed", errno=exc.errno, error=exc.strerror)
                return
            if buf is None:
                return
            try:
                self._dispatch(buf)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the reader
                self.counters.unexpected += 1
                log.exception("dispatch_failed", error=repr(exc), raw=buf[:64].hex())

    def _dispatch(self, buf: bytes) -> None:
        try:
            req = wire.parse(buf)
        except ProtocolError as exc:
            self.counters.malformed += 1
            log.error("malformed_message", error=exc.reason, msg_id=exc.msg_id, raw=buf[:64].hex(),
                      **({"fd_left_open": exc.fd} if exc.fd is not None else {}))
            self._run(self.objects.malformed(exc.msg_id, 0, is_open=exc.opcode == wire.Opcode.OPEN))
            return
        if isinstance(req, wire.OpenRequest):
            self.counters.opens += 1
            self._run(self.objects.open(req))
        elif isinstance(req, wire.ReadRequest):
            self._run(self.objects.read(req, time.perf_counter()))
        else:
            self.counters.closes += 1
            obj = self.objects.get(req.object_id)
            log.info("closed", op="CLOSE", msg_id=req.msg_id, object_id=req.object_id,
                     key=_text(obj.cookie_key) if obj else None,
                     blob=obj.blob_id if obj else None,
                     deferred_reads=len(obj.reads) if obj else 0)
            self._run(self.objects.close(req))

    # -- carrying out actions ----------------------------------------------------------

    def _run(self, actions: list[protocol.Action]) -> None:  # noqa: C901 - one branch per action
        for action in actions:
            if isinstance(action, protocol.Fill):
                self._fill(action)
            elif isinstance(action, protocol.Lookup):
                self._spawn(self._lookup(action))
            elif isinstance(action, protocol.Copen):
                if not self._copen(action.msg_id, action.size) and action.size >= 0:
                    self._run(self.objects.copen_refused(action.object_id, action.fd))
            elif isinstance(action, protocol.Complete):
                self._complete_without_data(action)
            elif isinstance(action, protocol.StartBackground):
                self._start_background(action)
            elif isinstance(action, protocol.CancelBackground):
                task = self._background.get(action.fd)
                if task is not None:
                    task.cancel()
            elif isinstance(action, protocol.CloseFd):
                _close_quietly(action.fd)
                self.store.keep_open(self.objects.blob_ids())
                self.engine.keep({o.object_id for o in self.objects.open_objects()})
            else:
                log.warning("request_ignored", msg_id=action.msg_id,
                            object_id=action.object_id, reason=action.reason)
        if not self._reading and self.objects.accepting:
            self._resume()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters.unexpected += 1
            exc = task.exception()
            log.error("task_failed", error=repr(exc), exc_info=exc)

    def _copen(self, msg_id: int, size: int) -> bool:
        try:
            self.device.copen(msg_id, size)
        except OSError as exc:
            # EINVAL: the OPEN was cancelled (object dropped); nothing waits on it.
            log.warning("copen_failed", msg_id=msg_id, size=size, errno=exc.errno)
            return False
        return True

    def _complete_without_data(self, action: protocol.Complete) -> None:
        try:
            self.backend.complete(action.fd, action.msg_id)
        except OSError as exc:
            log.warning("complete_failed", msg_id=action.msg_id, errno=exc.errno)

    # -- OPEN ------------------------------------------------------------------------

    async def _lookup(self, action: protocol.Lookup) -> None:
        start = time.perf_counter()
        blob: Blob | None = None
        bootstrap = False
        try:
            found, bootstrap = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._resolve, action.cookie_key, action.volume_key)
            blob, size, outcome = found, found.size, "ok"
        except BadKey as exc:
            size, outcome, error = -errno.ENOENT, "bad_key", str(exc)
        except UnknownName as exc:
            size, outcome, error = -errno.ENOENT, "unknown", str(exc)
        except (StoreError, OSError) as exc:
            size, outcome, error = -errno.EIO, "store_error", str(exc)
        except Exception as exc:  # noqa: BLE001 - the OPEN must be answered whatever broke
            self.counters.unexpected += 1
            size, outcome, error = -errno.EIO, "internal_error", repr(exc)
        if blob is None:
            self.counters.opens_failed += 1
        background = None
        if blob is not None and bootstrap and self._prefill_bootstrap:
            background = "prefill"
        elif blob is not None and not bootstrap and self._prefetch:
            background = "prefetch"
        log.info(
            "opened", op="OPEN", msg_id=action.msg_id, object_id=action.object_id,
            volume=_text(action.volume_key),
            domain=_text(wire.split_volume_key(action.volume_key)),  # domain_id, else the fsid
            key=_text(action.cookie_key), blob=blob.blob_id if blob else None, size=size,
            role=("bootstrap" if bootstrap else "data") if blob else None,
            outcome=outcome, duration_ms=ms_since(start), **({} if blob else {"error": error}),
        )
        if blob is not None:
            self.engine.blobs[action.object_id] = blob  # READs use this copy: no store access
        self._run(self.objects.looked_up(
            action.msg_id, blob.blob_id if blob else None, size,
            source=_source(blob), background=background))
        if blob is not None:
            self.store.lease_settled(blob.blob_id, self.objects.blob_ids())

    def _resolve(self, key: bytes, volume: bytes) -> tuple[Blob, bool]:
        """The blob a cookie key names, located for the image that reads it.

        A data blob is fetched from the location of the first image (in mount
        order) whose bootstrap this volume opened and that lists it: the image
        itself without a domain, the domain's first mount that uses it in one.
        """
        blob = self.store.open_blob(key)  # leased: gc keeps it while it is open
        name = key.decode()
        bootstrap = self.store.has_image(name)
        if isinstance(self.store, LocalStore):  # an --images directory has no remote blobs
            if bootstrap:  # noted (and saved) before the copen: a successor knows it too
                self.volumes.note(volume, name)
            blob = locate(self.store, blob, (name,) if bootstrap else self.volumes.opened(volume))
        return blob, bootstrap

    # -- READ ------------------------------------------------------------------------

    def _fill(self, action: protocol.Fill) -> None:
        self.counters.reads += 1
        self.engine.fill(action).add_done_callback(
            lambda fut: self._filled(action, fut.result()))

    def _filled(self, action: protocol.Fill, report: FillReport) -> None:
        """A READ ended: its one log line, then the machine decides what follows."""
        obj = self.objects.by_fd(action.fd)
        fields: dict[str, Any] = {
            "op": "READ", "msg_id": action.msg_id, "object_id": action.object_id,
            "key": _text(obj.cookie_key) if obj else None,
            "blob": action.blob_id, "off": action.off, "len": action.len,
            "chunks": report.chunks, "duration_ms": ms_since(report.started),
        }
        if report.error is None:
            self.counters.bytes_written += report.written
            log.info("read_completed", **fields, bytes=report.written, source=report.source,
                     outcome="ok")
        else:
            self.counters.reads_failed += 1
            exc = report.error
            log.warning("read_completed", **fields, bytes=0, outcome="eio",
                        error=str(exc) or repr(exc), error_type=type(exc).__name__)
        self._run(self.objects.fill_done(action.msg_id, report.outcome))

    # -- background writes -------------------------------------------------------------

    def _start_background(self, action: protocol.StartBackground) -> None:
        progress = Progress()
        task = asyncio.get_running_loop().create_task(
            self._write_background(action, progress))
        self._background[action.fd] = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _write_background(
        self, action: protocol.StartBackground, progress: Progress
    ) -> None:
        start = time.perf_counter()
        outcome, error = "ok", None
        try:
            await self.engine.background(action, progress)
        except (StoreError, OSError) as exc:
            outcome, error = "error", str(exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._background.pop(action.fd, None)
            self.counters.bytes_written += progress.written
            event = "read_ahead" if action.kind == "readahead" else "prefilled"
            (log.info if outcome == "ok" else log.warning)(
                event, object_id=action.object_id, blob=action.blob_id, kind=action.kind,
                off=action.off, len=action.end - action.off, bytes=progress.written,
                chunks_written=progress.chunks, outcome=outcome, duration_ms=ms_since(start),
                **({"note": progress.note} if progress.note else {}),
                **({"error": error} if error else {}),
            )
            self._run(self.objects.background_done(action.fd, ok=outcome == "ok"))

    # -- lifecycle ------------------------------------------------------------------

    def status(self) -> str:
        c = self.counters
        return (
            f"objects={len(self.objects)} reads={c.reads} failed={c.reads_failed} "
            f"bytes={c.bytes_written} in_flight={self.objects.reads_in_flight}"
        )

    async def drain(self, timeout: float) -> None:
        """Stop reading, let in-flight work finish (up to `timeout`), close fds."""
        self._stopping = True
        self._pause()
        self._run(self.objects.stop())  # prefill and readahead are optional; READs are not
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending: set[Any] = set(self._tasks) | self.engine.pending()
            if not pending:
                break
            log.info("draining", tasks=len(pending), timeout_s=timeout)
            _, late = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            if late and loop.time() >= deadline:
                # READ tasks end at once, their READs completed without data; the
                # batch jobs on the I/O pool only read the local store: let them end.
                for task in late:
                    if isinstance(task, asyncio.Task):
                        task.cancel()
                await asyncio.wait(late)
        await self.fetcher.aclose()
        self._run(self.objects.drain())


def _source(blob: Blob | None) -> str:
    """The source a blob's READs are bounded under: the local store or its registry."""
    if blob is None or not blob.is_remote:
        return protocol.LOCAL
    remote = blob.extra.get("remote")
    registry = remote.get("registry") if isinstance(remote, dict) else None
    return f"registry:{registry}" if registry else "remote"


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")



def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        log.warning("close_failed", fd=fd, errno=exc.errno)
