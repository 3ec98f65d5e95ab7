# SPDX-License-Identifier: Apache-2.0
"""The running daemon: reads requests, asks `protocol.Objects` what to do, does it.

The loop thread reads the device and writes `copen`s; store reads and anon-fd
writes run in a bounded thread pool. At most `concurrency` READs are filled at
once; beyond that the reader pauses and the kernel keeps the requests queued.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from ondemand_d import protocol, wire
from ondemand_d._native import Backend
from ondemand_d.errors import BadKey, ProtocolError, StoreError, UnknownName
from ondemand_d.store.fetch import ChunkFetcher, Claim
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import PAGE, Blob, Chunk

log = structlog.get_logger()
T = TypeVar("T")

#: Bytes per anon-fd write (and per verify job) when writing without a READ.
BACKGROUND_BATCH = 1 << 20


class DeviceLike(Protocol):
    """What the service needs of the devnode (the real Device or a test's fake)."""

    fd: int

    def read_message(self) -> bytes | None: ...

    def copen(self, msg_id: int, size_or_errno: int) -> None: ...


@dataclass(slots=True)
class _Read:
    """One READ on its way through the service."""

    action: protocol.Fill
    start: float
    blob: Blob | None = None
    chunks: tuple[Chunk, ...] = ()
    claim: Claim | None = None
    completed: bool = False  # set once the kernel was told; never tell it twice
    waits_on: str = "local"  # what it waits for: local (store), fetch (remote), joined


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
    """One bound device, one store, the object table and the tasks between them."""

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
    ) -> None:
        self.device = device
        self.store = store
        self.fetcher = fetcher
        self.backend = backend
        self.objects = protocol.Objects()
        self.counters = Counters()
        self._executor = executor
        self._slots = concurrency
        self._prefill_bootstrap = prefill_bootstrap
        self._prefetch = prefetch
        self._tasks: set[asyncio.Task[None]] = set()
        self.reads: dict[int, _Read] = {}  # msg_id -> READ in flight (for `inflight`)
        self._blobs: dict[str, Blob] = {}
        self._readahead = readahead
        # object_id -> the prefill or readahead writing into it, and what was written.
        self._background: dict[int, asyncio.Task[None]] = {}
        self._written: dict[int, set[int]] = {}
        self._jobs: set[Future[Any]] = set()  # fast-path READ batches on the I/O pool
        self._batch: list[_Read] = []
        # One batch job per pool thread, so a burst of READs uses every thread.
        self._io_jobs = max(1, getattr(executor, "_max_workers", 4))
        # Debug lines build lists per READ: only when someone will read them.
        self._debug = structlog.get_logger().is_enabled_for(logging.DEBUG)
        self._reading = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- reading ------------------------------------------------------------------

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
        """Read messages until the kernel has none queued or all slots are busy."""
        while not self._stopping:
            if self.objects.reads_in_flight >= self._slots:
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
            self._malformed(exc, buf)
            return
        if isinstance(req, wire.OpenRequest):
            self.counters.opens += 1
        elif isinstance(req, wire.CloseRequest):
            self.counters.closes += 1
            background = self._background.pop(req.object_id, None)
            if background is not None:
                background.cancel()
            obj = self.objects.get(req.object_id)
            log.info(
                "closed",
                op="CLOSE",
                msg_id=req.msg_id,
                object_id=req.object_id,
                key=_text(obj.cookie_key) if obj else None,
                blob=obj.blob_id if obj else None,
                deferred_reads=len(obj.inflight) if obj else 0,
            )
        self._perform(self.objects.handle(req))

    def _malformed(self, exc: ProtocolError, buf: bytes) -> None:
        """Log and survive; answer what can be answered so nothing hangs."""
        self.counters.malformed += 1
        log.error("malformed_message", error=exc.reason, msg_id=exc.msg_id, raw=buf[:64].hex())
        if exc.msg_id is None or exc.opcode != wire.Opcode.OPEN:
            return  # a READ we cannot parse has no object we could complete it on
        self._copen(exc.msg_id, -errno.EINVAL)  # else the mount waits for it forever
        if exc.fd is not None and self._is_anon_fd(exc.fd):
            _close_quietly(exc.fd)

    def _is_anon_fd(self, fd: int) -> bool:
        """Whether `fd` may be an OPEN's anon fd: never one of ours (the device, stdio)."""
        if fd <= 2 or fd == self.device.fd:  # noqa: PLR2004 - stdin, stdout, stderr
            return False
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        # The kernel's anon fds, or (under the fake kernel) plain cache files.
        return target == "anon_inode:[cachefiles]" or (
            target.startswith("/") and not target.startswith("/dev/"))

    # -- carrying out actions -----------------------------------------------------

    def _perform(self, actions: list[protocol.Action]) -> None:
        for action in actions:
            if isinstance(action, protocol.Lookup):
                self._spawn(self._lookup(action))
            elif isinstance(action, protocol.Copen):
                if not self._copen(action.msg_id, action.size) and action.size >= 0:
                    self._perform(self.objects.forget(action.object_id))
            elif isinstance(action, protocol.Fill):
                self._start_read(action)
            elif isinstance(action, protocol.Prefill):
                self._start_prefill(action)
            elif isinstance(action, protocol.CloseFd):
                _close_quietly(action.fd)
                self._written.pop(action.object_id, None)
                self.store.keep_open(self.objects.blob_ids())
                if len(self._blobs) > 2 * len(self.objects) + 8:  # keep chunk tables in use
                    keep = self.objects.blob_ids()
                    self._blobs = {k: v for k, v in self._blobs.items() if k in keep}
            else:
                log.warning(
                    "request_ignored",
                    msg_id=action.msg_id,
                    object_id=action.object_id,
                    reason=action.reason,
                )

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

    async def _lookup(self, action: protocol.Lookup) -> None:
        start = time.perf_counter()
        key = _text(action.cookie_key)
        blob: Blob | None = None
        bootstrap = False
        try:
            found, bootstrap = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._resolve, action.cookie_key
            )
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
        prefill = blob is not None and (
            (bootstrap and self._prefill_bootstrap) or (not bootstrap and self._prefetch)
        )
        log.info(
            "opened",
            op="OPEN",
            msg_id=action.msg_id,
            object_id=action.object_id,
            volume=_text(action.volume_key),
            domain=_text(wire.split_volume_key(action.volume_key)),  # domain_id, else the fsid
            key=key,
            blob=blob.blob_id if blob else None,
            size=size,
            role=("bootstrap" if bootstrap else "data") if blob else None,
            outcome=outcome,
            duration_ms=_ms(start),
            **({} if blob else {"error": error}),
        )
        self._perform(
            self.objects.opened(
                action.msg_id, action.object_id, blob.blob_id if blob else None, size,
                prefill=prefill,
            )
        )
        if blob is not None:
            self.store.lease_settled(blob.blob_id, self.objects.blob_ids())

    def _resolve(self, key: bytes) -> tuple[Blob, bool]:
        blob = self.store.open_blob(key)  # leased: gc keeps it while it is open
        self._blobs[blob.blob_id] = blob  # READs use this copy: no store access per READ
        return blob, self.store.has_image(key.decode())

    def _start_read(self, action: protocol.Fill) -> None:
        """Begin filling a READ.

        Fast path: every chunk is local and no other READ is fetching one of
        them. Then reading, verifying, writing and completing happen on the
        I/O pool in a batch with the other READs of the same burst, with no
        task on the loop. Otherwise a task gathers the chunks (single-flight,
        remote) and writes them.
        """
        self.counters.reads += 1
        read = self.reads[action.msg_id] = _Read(action, time.perf_counter())
        try:
            read.blob = self._blob(action.blob_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged chunk table: EIO, not a hang
            self._finish_read(read, exc)
            return
        read.chunks = read.blob.chunks_for(action.off, action.len)
        if read.chunks:
            read.claim = claim = self.fetcher.claim(read.chunks)
            if self._debug:
                log.debug(
                    "read_planned", msg_id=action.msg_id, span_off=read.chunks[0].offset,
                    span_end=read.chunks[-1].end, digests=[c.digest[:12] for c in read.chunks],
                    to_fetch=len(claim.owned), joined=len(claim.joined),
                    cached=len(read.chunks) - len(claim.owned) - len(claim.joined),
                )
            if read.claim.owned and not read.claim.joined:
                self._batch.append(read)
                if len(self._batch) == 1:
                    asyncio.get_running_loop().call_soon(self._submit_batch)
                return
            read.waits_on = "joined" if read.claim.joined else "fetch"
        self._spawn(self._slow_read(read, None))

    def _submit_batch(self) -> None:
        """Hand the fast-path READs of one burst to the I/O pool, a few jobs per burst.

        One job per READ would cost a thread hand-off and a loop wake-up each;
        a burst of READs read together shares them.
        """
        batch, self._batch = self._batch, []
        loop = asyncio.get_running_loop()
        per_job = max(1, -(-len(batch) // self._io_jobs))
        for i in range(0, len(batch), per_job):
            part = batch[i : i + per_job]
            job = self._executor.submit(self._run_batch, part)
            self._jobs.add(job)
            job.add_done_callback(functools.partial(self._batch_job_ended, loop, part))

    def _batch_job_ended(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Read], job: Future[list[Any]]
    ) -> None:
        """I/O thread: hand the finished batch back to the loop."""
        loop.call_soon_threadsafe(self._batch_done, batch, job)

    def _run_batch(self, batch: list[_Read]) -> list[tuple[list[bytes | None], int] | BaseException]:
        """I/O thread: each READ's owned chunks read and verified; all local ones written."""
        results: list[tuple[list[bytes | None], int] | BaseException] = []
        for read in batch:
            try:
                results.append(self._read_and_write(read))
            except Exception as exc:  # noqa: BLE001 - reported per READ, which then gets EIO
                results.append(exc)
        return results

    def _read_and_write(self, read: _Read) -> tuple[list[bytes | None], int]:
        assert read.claim is not None  # noqa: S101 - set by _start_read
        got = self.fetcher.read_local([c for _, c, _ in read.claim.owned])
        if any(d is None for d in got):
            return got, -1
        it = iter(got)
        parts = [d if d is not None else next(it) for d in read.claim.data]
        return got, self._write_sync(read, [p for p in parts if p is not None])

    def _batch_done(self, batch: list[_Read], job: Future[list[Any]]) -> None:
        self._jobs.discard(job)
        exc = job.exception()
        results = [exc] * len(batch) if exc is not None else job.result()
        for read, result in zip(batch, results, strict=True):
            assert read.claim is not None  # noqa: S101 - set by _start_read
            if isinstance(result, BaseException):
                self.fetcher.settle(read.claim, result)
                self._finish_read(read, result)
                continue
            got, written = result
            if written < 0:  # some chunks must come from the remote source
                read.waits_on = "fetch"
                self._spawn(self._slow_read(read, got))
                continue
            self.fetcher.settle(read.claim, got)
            self._finish_read(read, None, written, "local")

    async def _slow_read(self, read: _Read, got: list[bytes | None] | None) -> None:
        try:
            written, source = await self._gather_and_write(read, got)
        except (StoreError, OSError) as exc:
            self._finish_read(read, exc)
        except BaseException as exc:
            self._finish_read(read, exc)
            raise
        else:
            self._finish_read(read, None, written, source)

    async def _gather_and_write(
        self, read: _Read, got: list[bytes | None] | None
    ) -> tuple[int, str]:
        parts: list[bytes] = []
        source = "zero"
        if read.claim is not None:
            assert read.blob is not None  # noqa: S101 - set by _start_read
            parts, source = await self.fetcher.fetch_claimed(read.blob, read.claim, got)
        return await self._in_thread(lambda: self._write_sync(read, parts)), source

    def _write_sync(self, read: _Read, parts: list[bytes]) -> int:
        """Write verified chunk bytes and complete the READ (I/O thread)."""
        action, blob = read.action, read.blob
        assert blob is not None  # noqa: S101 - set by _start_read
        if read.chunks:
            start = read.chunks[0].offset
        else:  # past the blob's end: the kernel still needs the range present
            start = action.off - action.off % PAGE
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        # Zero-pad to the end of the asked range where it lies past the blob's end.
        want_end = _round_up(action.off + action.len)
        if start + len(data) < want_end and start + len(data) >= blob.size:
            data += bytes(want_end - start - len(data))
        if self._debug:
            log.debug("read_writing", msg_id=action.msg_id, at=start, bytes=len(data),
                      backend=self.backend.name)
        self.backend.fill(action.fd, data, start, action.msg_id, complete=True)
        read.completed = True
        return _round_up(len(data))

    def _finish_read(
        self, read: _Read, exc: BaseException | None, written: int = 0, source: str = ""
    ) -> None:
        """Complete without data on failure, log the READ's one line, free its slot."""
        action = read.action
        self.reads.pop(action.msg_id, None)
        obj = self.objects.get(action.object_id)
        fields: dict[str, Any] = {
            "op": "READ", "msg_id": action.msg_id, "object_id": action.object_id,
            "key": _text(obj.cookie_key) if obj else None,
            "blob": action.blob_id, "off": action.off, "len": action.len,
            "chunks": len(read.chunks), "duration_ms": _ms(read.start),
        }
        if exc is None:
            self.counters.bytes_written += written
            log.info("read_completed", **fields, bytes=written, source=source, outcome="ok")
            if obj is not None:
                self._written.setdefault(obj.object_id, set()).update(
                    c.offset for c in read.chunks)
                self._start_readahead(read)
        else:
            self.counters.reads_failed += 1
            if not read.completed:
                self._complete_without_data(action)
            log.warning(
                "read_completed", **fields, bytes=0, outcome="eio", error=str(exc) or repr(exc),
                error_type=type(exc).__name__,
            )
        self._perform(self.objects.read_done(action.msg_id))
        self._resume()

    def _blob(self, blob_id: str) -> Blob:
        blob = self._blobs.get(blob_id)
        return blob if blob is not None else self.store.get_blob(blob_id)

    async def _in_thread(self, job: Callable[[], T]) -> T:
        """Run `job` in the pool; if cancelled, still let it finish (the kernel waits on it)."""
        fut = asyncio.get_running_loop().run_in_executor(self._executor, job)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await fut
            raise

    def _complete_without_data(self, action: protocol.Fill) -> None:
        try:
            self.backend.complete(action.fd, action.msg_id)
        except OSError as exc:
            log.warning("complete_failed", msg_id=action.msg_id, errno=exc.errno)

    def _start_prefill(self, action: protocol.Prefill) -> None:
        blob = self._blob(action.blob_id)
        self._start_background(action.object_id, action.fd, blob, blob.chunks, "prefill")

    def _start_readahead(self, read: _Read) -> None:
        """After a READ, write the chunks that follow it before the kernel asks.

        A sequential reader otherwise waits for one READ per chunk, and each
        READ waits for its chunk to be read and verified. One readahead runs
        per object at a time; chunks already written are skipped.
        """
        obj = self.objects.get(read.action.object_id)
        if (not self._readahead or obj is None or obj.closing or not read.chunks
                or read.blob is None or read.action.object_id in self._background):
            return
        written = self._written.setdefault(obj.object_id, set())
        window = [c for c in read.blob.chunks_for(read.chunks[-1].end, self._readahead)
                  if c.offset not in written]
        if window:
            self._start_background(obj.object_id, obj.fd, read.blob, tuple(window), "readahead")

    def _start_background(
        self, object_id: int, fd: int, blob: Blob, chunks: tuple[Chunk, ...], kind: str
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._write_background(object_id, fd, blob, chunks, kind))
        self._background[object_id] = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        task.add_done_callback(lambda t: self._background.pop(object_id, None)
                               if self._background.get(object_id) is t else None)

    async def _write_background(
        self, object_id: int, fd: int, blob: Blob, chunks: tuple[Chunk, ...], kind: str
    ) -> None:
        """Write chunks no READ asked for: a whole bootstrap (prefill) or readahead.

        Works on its own dup of the anon fd: a CLOSE may close the object's fd
        (and the number be reused for another object) while this runs; the
        CLOSE also cancels it. A prefill of a remote blob is fetched at
        prefetch priority. Batches are read and verified concurrently, so
        hashing uses every core.
        """
        start = time.perf_counter()
        written = 0
        outcome, error = "ok", None
        fd = os.dup(fd)
        done = self._written.setdefault(object_id, set())
        priority = getattr(self.fetcher.remote, "prefetching", None)
        low = kind == "prefill" and priority is not None and blob.is_remote

        async def write(batch: tuple[Chunk, ...]) -> int:
            parts, _ = await self.fetcher.get(blob, batch)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            await self._in_thread(
                functools.partial(self.backend.fill, fd, data, batch[0].offset, 0, complete=False))
            done.update(c.offset for c in batch)
            return _round_up(len(data))

        try:
            with priority() if low else contextlib.nullcontext():  # type: ignore[misc]
                batches = _batches(chunks, BACKGROUND_BATCH)
                for i in range(0, len(batches), self._io_jobs):
                    sizes = await asyncio.gather(*map(write, batches[i : i + self._io_jobs]))
                    written += sum(sizes)
        except (StoreError, OSError) as exc:
            outcome, error = "error", str(exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            os.close(fd)
            self.counters.bytes_written += written
            event = "prefilled" if kind == "prefill" else "read_ahead"
            (log.info if outcome == "ok" else log.warning)(
                event, object_id=object_id, blob=blob.blob_id, off=chunks[0].offset,
                len=chunks[-1].end - chunks[0].offset, bytes=written, outcome=outcome,
                duration_ms=_ms(start), **({"error": error} if error else {}),
            )

    # -- lifecycle ----------------------------------------------------------------

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
        for background in list(self._background.values()):
            background.cancel()  # prefill and readahead are optional; READs are not
        pending: set[Any] = set(self._tasks)
        pending |= {asyncio.wrap_future(j) for j in self._jobs}
        if pending:
            log.info("draining", tasks=len(pending), timeout_s=timeout)
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._perform(self.objects.drain())


def _batches(chunks: tuple[Chunk, ...], limit: int) -> list[tuple[Chunk, ...]]:
    """Contiguous runs of chunks of about `limit` bytes each.

    A batch is written as one buffer at its first chunk's offset, so a gap
    (a chunk already written) must end the run: otherwise every chunk after
    the gap would land one slot early.
    """
    out: list[tuple[Chunk, ...]] = []
    run: list[Chunk] = []
    size = 0
    for chunk in chunks:
        if run and chunk.offset != run[-1].end:
            out.append(tuple(run))
            run, size = [], 0
        run.append(chunk)
        size += chunk.length
        if size >= limit:
            out.append(tuple(run))
            run, size = [], 0
    if run:
        out.append(tuple(run))
    return out


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        log.warning("close_failed", fd=fd, errno=exc.errno)
