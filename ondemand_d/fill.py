# SPDX-License-Identifier: Apache-2.0
"""The fill engine: a READ's chunks (or a background range) into the anon fd; outcomes out.

It decides nothing about objects and never calls back into the service:
`fill(action)` returns a future of a `FillReport` (whose `outcome` goes to
`protocol.Objects.fill_done`), `background(action, progress)` is a coroutine
whose end the service reports to `background_done`.

A READ is filled with the whole store chunks around its range, page aligned,
zero-padded past the blob's end. When every chunk is in the local store and no
other caller is fetching one of them, reading, verifying, writing and
completing run on the I/O pool in one batch with the other READs of the same
burst (no task on the loop). Otherwise a task fetches through the
`ChunkFetcher` (single-flight, remote) and writes, at most `FILL_WINDOW` bytes
at a time, so memory does not follow the READ's length.

Background writes (prefill, prefetch, readahead) first ask the cache file what
it holds (SEEK_DATA/SEEK_HOLE on the anon fd) and write only the chunks that
meet a hole: a remount of a fully cached image writes nothing. They ask again
right before each write, and so does a READ that joined another caller's fetch,
under a lock per fd: of two writers of one chunk (a READ and the readahead that
fetched it), the second finds it written and writes nothing.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import os
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ondemand_d import cachedir, protocol
from ondemand_d.erofs_meta import metadata_ranges
from ondemand_d._native import Backend
from ondemand_d.errors import StoreError
from ondemand_d.store.fetch import ChunkFetcher, Claim
from ondemand_d.store.limits import DEFAULT_MAX_BOOTSTRAP
from ondemand_d.store.model import PAGE, Blob, Chunk

T = TypeVar("T")
log = structlog.get_logger()

#: Bytes of chunks one READ holds in memory at once.
FILL_WINDOW = 8 << 20
#: Zeros written past the blob's last page for a READ that runs past it, at most.
PAD_LIMIT = 1 << 20
#: Bytes per anon-fd write (and per verify job) when writing without a READ.
BACKGROUND_BATCH = 1 << 20


@dataclass(frozen=True, slots=True)
class Span:
    """What a READ writes: `chunks` from `start`, then zeros up to `pad_to`."""

    chunks: tuple[Chunk, ...]
    start: int
    data_end: int
    pad_to: int


def plan(blob: Blob, off: int, length: int) -> Span:
    """The chunks and zero padding that make [off, off+length) present (pure).

    The range is widened to whole pages; the part past the blob's end is zeros,
    at most `PAD_LIMIT` bytes past its last page (the kernel never asks beyond
    it for a well-formed image).
    """
    first = off - off % PAGE
    want_end = _round_up(off + length)
    chunks = blob.chunks_for(first, want_end - first)
    start = chunks[0].offset if chunks else first
    data_end = _round_up(chunks[-1].end) if chunks else start
    pad_to = data_end
    if want_end > data_end and (not chunks or chunks[-1].end >= blob.size):
        pad_to = max(data_end, min(want_end, _round_up(blob.size) + PAD_LIMIT))
    return Span(chunks, start, data_end, pad_to)


def in_holes(chunks: tuple[Chunk, ...], gaps: list[tuple[int, int]]) -> tuple[Chunk, ...]:
    """The chunks whose pages meet a hole in `gaps` (sorted (start, end) pairs; pure)."""
    out = []
    for chunk in chunks:
        end = _round_up(chunk.end)
        if any(s < end and chunk.offset < e for s, e in gaps):
            out.append(chunk)
    return tuple(out)


def windows(chunks: tuple[Chunk, ...], limit: int) -> list[tuple[Chunk, ...]]:
    """Contiguous runs of chunks of about `limit` bytes each (a gap ends a run).

    A run is written as one buffer at its first chunk's offset, so a gap (a
    chunk already written) must end it: otherwise every chunk after the gap
    would land one slot early.
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


@dataclass(slots=True)
class FillReport:
    """How a READ ended: the outcome for the protocol, and what the log line says."""

    outcome: protocol.FillOutcome
    started: float  # time.perf_counter() when the fill began
    chunks: int = 0
    written: int = 0
    source: str = ""
    error: BaseException | None = None


@dataclass(slots=True)
class ReadJob:
    """One READ being filled (the control socket's `inflight` lists these)."""

    action: protocol.Fill
    start: float
    span: Span | None = None
    claim: Claim | None = None
    completed: bool = False  # set once the kernel was told; never tell it twice
    # Fast path, under FillEngine._phase_lock: queued -> reading -> writing (the I/O thread)
    # or reading -> expired (the loop, at the local read deadline). Only the side that made
    # the move may answer the READ, so a late thread never writes or completes.
    phase: str = "queued"
    batch: object = None  # the batch whose thread may take it (a queued READ can move)
    reading_since: float = 0.0
    future: asyncio.Future[FillReport] = field(default_factory=lambda: asyncio.Future())

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        return self.span.chunks if self.span is not None else ()

    @property
    def waits_on(self) -> str:
        return self.claim.stage if self.claim is not None else "local"


@dataclass(slots=True)
class Progress:
    """What a background write did so far (read after it ends, however it ends)."""

    written: int = 0
    chunks: int = 0  # chunks that met a hole and were written
    note: str = ""  # what was chosen (metadata only, or why the whole blob)


class FillEngine:
    """Fills READs and background ranges from verified chunks.

    Args:
        fetcher: verified chunk bytes (single-flight, local and remote).
        backend: the write + complete path (_native).
        executor: the I/O pool; `io_jobs` batch jobs per burst use it.
        debug: log each READ's plan and write (structlog's debug level).
        whole_prefill_cap: largest bootstrap prefilled whole when the metadata walk gives up.
        cache_limit: background writes stop before the cache files pass it.
    """

    def __init__(self, fetcher: ChunkFetcher, backend: Backend, executor: Executor, *,
                 io_jobs: int = 4, log: Any = None,
                 whole_prefill_cap: int = DEFAULT_MAX_BOOTSTRAP,
                 cache_limit: CacheLimit | None = None) -> None:
        self.fetcher = fetcher
        self.whole_prefill_cap = whole_prefill_cap
        self.cache_limit = cache_limit
        self.backend = backend
        # Chunk tables of open objects by object id, located for the image that opened
        # each (store/locations.py): two objects of one blob may fetch from different places.
        self.blobs: dict[int, Blob] = {}
        self.reads: dict[int, ReadJob] = {}  # msg_id -> READ being filled
        self._executor = executor
        self._io_jobs = max(1, io_jobs)
        self._log = log
        self._batch: list[ReadJob] = []
        self._jobs: set[Future[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Per anon fd: "ask the cache file, then write the holes" is one step for the
        # writers that may overlap (joined READs, background writes), so one of two
        # writers of the same chunk finds it written instead of writing it again.
        self._write_locks: dict[int, threading.Lock] = {}
        self._phase_lock = threading.Lock()
        self._stuck_jobs: set[Future[Any]] = set()  # batch jobs whose thread a read holds

    # -- READs -----------------------------------------------------------------------

    def fill(self, action: protocol.Fill) -> asyncio.Future[FillReport]:
        """Start filling a READ; the future resolves (never raises) when it ended."""
        job = ReadJob(action, time.perf_counter(),
                      future=asyncio.get_running_loop().create_future())
        self.reads[action.msg_id] = job
        try:
            blob = self.blobs[action.object_id]
            job.span = plan(blob, action.off, action.len)
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged chunk table: EIO, not a hang
            self._end(job, exc)
            return job.future
        span = job.span
        if self.cache_limit is not None and self.cache_limit.cache_max:
            full = self.cache_limit.room(max(span.pad_to, span.data_end) - span.start)
            if full is not None:
                log.warning("cache_full", frontend="fscache", msg_id=action.msg_id,
                            blob=action.blob_id, off=action.off, len=action.len, error=full)
                self._end(job, OSError(errno.ENOSPC, full))
                return job.future
        fast = span.chunks and span.data_end - span.start <= FILL_WINDOW
        if fast:
            job.claim = self.fetcher.claim(span.chunks)
            if self._log is not None:
                c = job.claim
                self._log.debug(
                    "read_planned", msg_id=action.msg_id, span_off=span.start,
                    span_end=span.chunks[-1].end, digests=[x.digest[:12] for x in span.chunks],
                    to_fetch=c.owned, joined=c.joined, cached=c.cached)
            if not job.claim.needs_loop:
                self._batch.append(job)
                if len(self._batch) == 1:
                    asyncio.get_running_loop().call_soon(self._submit_batch)
                return job.future
        self._spawn(self._slow(job, blob))
        return job.future

    def _submit_batch(self) -> None:
        """Hand the fast-path READs of one burst to the I/O pool, a few jobs per burst."""
        batch, self._batch = self._batch, []
        per_job = max(1, -(-len(batch) // self._io_jobs))
        for i in range(0, len(batch), per_job):
            self._submit(batch[i : i + per_job])

    def _submit(self, part: list[ReadJob]) -> None:
        loop = asyncio.get_running_loop()
        for read in part:
            read.batch = part
        job = self._executor.submit(self._run_batch, part)
        self._jobs.add(job)
        job.add_done_callback(functools.partial(self._batch_job_ended, loop, part))
        if self.fetcher.local_timeout is not None:
            loop.call_later(self.fetcher.local_timeout, self._batch_deadline, part, job)

    def _batch_deadline(self, part: list[ReadJob], job: Future[Any]) -> None:
        """Loop: fail the READ whose local read passed the deadline; move the ones after it.

        The thread stays stuck in the kernel (it cannot be interrupted); the READs it has
        not begun go to a new job, so they do not wait for it.
        """
        if job.done():
            return
        timeout = self.fetcher.local_timeout
        assert timeout is not None  # noqa: S101 - armed only with one
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        expired: ReadJob | None = None
        moved: list[ReadJob] = []
        with self._phase_lock:
            for read in part:
                if read.batch is not part:
                    continue
                if read.phase == "reading":
                    late = now - read.reading_since
                    if late < timeout:  # it began later than the batch: its own deadline
                        loop.call_later(timeout - late, self._batch_deadline, part, job)
                        return
                    read.phase = "expired"
                    expired = read
                elif read.phase == "queued" and expired is not None:
                    read.batch = None  # the stuck thread must not take it
                    moved.append(read)
        if expired is None:  # not begun (every I/O thread busy) or between READs: later
            loop.call_later(timeout, self._batch_deadline, part, job)
            return
        self._stuck_jobs.add(job)
        assert expired.claim is not None  # noqa: S101 - set by fill()
        error = self.fetcher.read_stuck(expired.claim)
        self.fetcher.settle(expired.claim, error)
        self._end(expired, error)
        if moved:
            self._submit(moved)

    def _move(self, read: ReadJob, part: list[ReadJob], before: str, after: str) -> bool:
        """I/O thread: `before` -> `after` unless the loop took the READ (expired, moved)."""
        with self._phase_lock:
            if read.batch is not part or read.phase != before:
                return False
            read.phase = after
            read.reading_since = time.monotonic()
            return True

    def _batch_job_ended(
        self, loop: asyncio.AbstractEventLoop, batch: list[ReadJob], job: Future[Any]
    ) -> None:
        """I/O thread: hand the finished batch back to the loop."""
        loop.call_soon_threadsafe(self._batch_done, batch, job)

    def _run_batch(self, batch: list[ReadJob]) -> list[int | BaseException]:
        """I/O thread: each READ read and verified from the store, written, completed.

        -1 for a READ that needs the remote source.
        """
        results: list[int | BaseException | None] = []
        for job in batch:
            if not self._move(job, batch, "queued", "reading"):
                results.append(None)  # moved to another job
                continue
            try:
                assert job.claim is not None  # noqa: S101 - set by fill()
                local = self.fetcher.read_owned(job.claim)
            except Exception as exc:  # noqa: BLE001 - reported per READ, which then gets EIO
                results.append(exc if self._move(job, batch, "reading", "writing") else None)
                continue
            if not self._move(job, batch, "reading", "writing"):
                results.append(None)  # answered at the deadline: write and complete nothing
                continue
            try:
                results.append(self._write(job, job.claim.parts(), last=True) if local else -1)
            except Exception as exc:  # noqa: BLE001 - reported per READ, which then gets EIO
                results.append(exc)
        return results

    def _batch_done(self, batch: list[ReadJob], job: Future[list[Any]]) -> None:
        self._jobs.discard(job)
        self._stuck_jobs.discard(job)
        exc = job.exception()
        results = [exc] * len(batch) if exc is not None else job.result()
        for read, result in zip(batch, results, strict=True):
            assert read.claim is not None  # noqa: S101 - set by fill()
            if read.batch is not batch:
                continue  # moved to another job, which answers it
            if read.phase == "expired":
                self.fetcher.read_returned(read.claim)  # answered already; nothing written
            elif isinstance(result, BaseException):
                self.fetcher.settle(read.claim, result)
                self._end(read, result)
            elif result is None:  # pragma: no cover - None only for a moved or expired READ
                continue
            elif result < 0:  # some chunks must come from the remote source
                self._spawn(self._slow(read, self.blobs[read.action.object_id]))
            else:
                self.fetcher.settle(read.claim)
                self._end(read, None, result, read.claim.source)

    async def _slow(self, job: ReadJob, blob: Blob) -> None:
        span = job.span
        assert span is not None  # noqa: S101 - set by fill()
        written, source = 0, "zero"
        try:
            parts_of = windows(span.chunks, FILL_WINDOW)
            if not parts_of:
                written = await self._in_thread(lambda: self._write(job, [], last=True))
            for n, chunks in enumerate(parts_of):
                claim = job.claim if job.claim is not None and n == 0 else None
                job.claim = claim or self.fetcher.claim(chunks)
                joined = job.claim.joined > 0
                parts = await self.fetcher.finish(blob, job.claim)
                source = _farthest(source, job.claim.source)
                last = n == len(parts_of) - 1
                written += await self._in_thread(functools.partial(
                    self._write, job, parts, last=last, at=chunks[0].offset,
                    unless_written=joined))
        except (StoreError, OSError) as exc:
            self._end(job, exc)
        except BaseException as exc:
            self._end(job, exc)
            raise
        else:
            self._end(job, None, written, source)

    def _write(self, job: ReadJob, parts: list[bytes], *, last: bool, at: int | None = None,
               unless_written: bool = False) -> int:
        """Write verified chunk bytes (and, if last, the padding), then complete (I/O thread).

        The bytes are copied once into a reused page-aligned buffer and written
        from there, a buffer at a time; the last write also completes (_native).
        `unless_written`: a READ that joined another caller's fetch (a readahead's)
        first asks the cache file; if that caller already wrote every page, it
        only completes.
        """
        action, span = job.action, job.span
        assert span is not None  # noqa: S101 - set by fill()
        at = span.start if at is None else at
        if unless_written:
            end = span.pad_to if last else _round_up(at + sum(len(p) for p in parts))
            with self._write_lock(action.fd):
                if cachedir.holes(action.fd, at, end):
                    return self._write(job, parts, last=last, at=at)
            if self._log is not None:
                self._log.debug("read_already_written", msg_id=action.msg_id, at=at, end=end)
            if last:
                self.backend.complete(action.fd, action.msg_id)
                job.completed = True
            return 0
        if self._log is not None:
            self._log.debug("read_writing", msg_id=action.msg_id, at=at,
                            bytes=sum(len(p) for p in parts), backend=self.backend.name)
        written = self.backend.fill_parts(action.fd, parts, at, action.msg_id, complete=last,
                                          size=span.pad_to - at if last else 0)
        if last:
            job.completed = True
        return written

    def _end(self, job: ReadJob, exc: BaseException | None, written: int = 0,
             source: str = "") -> None:
        self.reads.pop(job.action.msg_id, None)
        if job.future.done():
            return
        if exc is None:
            assert job.span is not None  # noqa: S101 - a READ without a plan failed
            report = FillReport(protocol.Filled(max(job.span.pad_to, job.span.data_end)),
                                job.start, len(job.chunks), written, source)
        else:
            report = FillReport(protocol.Failed(completed=job.completed), job.start,
                                len(job.chunks), error=exc)
        job.future.set_result(report)

    # -- background -------------------------------------------------------------------

    async def background(self, action: protocol.StartBackground, progress: Progress) -> None:
        """Write [off, end) of the blob where the cache file has holes.

        A prefill (a bootstrap) writes only the image's metadata blocks
        (erofs_meta.py); if the walk gives up, the whole blob when it is at most
        `whole_prefill_cap` bytes, else nothing (a hostile bootstrap must not cost
        a write of all it declares; the kernel READs what it needs). Batches are
        read and verified concurrently on half the I/O pool, so READs overtake a
        background write. A prefill or prefetch of a remote blob is fetched at
        prefetch priority. Cancelling it stops after the writes under way, and
        every write stops before the cache files pass `cache_limit`.
        """
        blob = self.blobs[action.object_id]
        chunks = blob.chunks_for(action.off, action.end - action.off)
        if not chunks:
            return
        gaps = await self._in_thread(functools.partial(
            cachedir.holes, action.fd, chunks[0].offset, _round_up(chunks[-1].end)))
        if not gaps:
            return  # all cached: a remount writes nothing
        priority = getattr(self.fetcher.remote, "prefetching", None)
        low = action.kind != "readahead" and priority is not None and blob.is_remote
        jobs = max(1, self._io_jobs // 2)
        with priority() if low else contextlib.nullcontext():  # type: ignore[misc]
            if action.kind == "prefill":
                meta = await self._metadata(blob, progress)
                if meta is not None:
                    await self._write_pieces(action.fd, blob, _intersect(meta, gaps), jobs,
                                             progress)
                    return
                if blob.size > self.whole_prefill_cap:
                    progress.note += (f": {blob.size} bytes is above the cap of "
                                      f"{self.whole_prefill_cap}, nothing prefilled")
                    return
                progress.note += ": the whole blob"
            chunks = in_holes(chunks, gaps)
            progress.chunks = len(chunks)

            async def write(batch: tuple[Chunk, ...]) -> None:
                parts, _ = await self.fetcher.get(blob, batch)
                n = await self._in_thread(functools.partial(
                    self._write_holes, action.fd, batch, parts))
                progress.written += n  # after the await: the batches run concurrently

            batches = windows(chunks, BACKGROUND_BATCH)
            for i in range(0, len(batches), jobs):
                group = batches[i : i + jobs]
                if await self._at_limit(sum(c.length for b in group for c in b), progress):
                    return
                await asyncio.gather(*map(write, group))

    async def _metadata(self, blob: Blob, progress: Progress) -> list[tuple[int, int]] | None:
        """The blob's EROFS metadata ranges, or None if the walk gives up."""
        try:
            ranges = await metadata_of(self.fetcher, blob, self._in_thread)
        except MetadataWalkError as exc:
            progress.note = f"not walked as EROFS ({exc})"
            return None
        progress.note = f"metadata: {sum(e - s for s, e in ranges)} bytes"
        return ranges

    async def _write_pieces(self, fd: int, blob: Blob, pieces: list[tuple[int, int]],
                            jobs: int, progress: Progress) -> None:
        """Write byte ranges of the blob (block aligned), chunk by chunk."""
        by_chunk: dict[int, tuple[Chunk, list[tuple[int, int]]]] = {}
        for start, end in pieces:
            for chunk in blob.chunks_for(start, end - start):
                entry = by_chunk.setdefault(chunk.offset, (chunk, []))
                entry[1].append((max(start, chunk.offset), min(end, chunk.end)))
        progress.chunks = len(by_chunk)

        def write_spans(chunk: Chunk, spans: list[tuple[int, int]], data: bytes) -> int:
            view, n = memoryview(data), 0
            with self._write_lock(fd):  # asked again now: a READ may have written it
                gaps = cachedir.holes(fd, chunk.offset, _round_up(chunk.end))
                for s, e in _intersect(spans, gaps):
                    n += int(self.backend.fill_parts(
                        fd, [view[s - chunk.offset : e - chunk.offset]], s, 0, complete=False))
            return n

        async def write(chunk: Chunk, spans: list[tuple[int, int]]) -> None:
            parts, _ = await self.fetcher.get(blob, (chunk,))
            progress.written += await self._in_thread(
                functools.partial(write_spans, chunk, spans, parts[0]))

        work = list(by_chunk.values())
        for i in range(0, len(work), jobs):
            group = work[i : i + jobs]
            if await self._at_limit(sum(e - s for _, spans in group for s, e in spans), progress):
                return
            await asyncio.gather(*(write(c, spans) for c, spans in group))

    async def _at_limit(self, need: int, progress: Progress) -> bool:
        """Whether writing `need` more bytes would pass cache_max (then the note says so).

        Background writes are optional: they stop here, and the kernel READs the rest. A
        few concurrent writers may each pass the check once, so the cache can exceed the
        limit by one group of batches per writer.
        """
        limit = self.cache_limit
        if limit is None or not limit.cache_max:
            return False
        used = await self._in_thread(limit.used)
        if used + need <= limit.cache_max:
            return False  # counted by the next scan (writes run after this check)
        progress.note = ((progress.note + "; ") if progress.note else "") + (
            f"stopped at cache_max: {used} bytes cached and {need} more would pass "
            f"{limit.cache_max}")
        return True

    def _write_holes(self, fd: int, batch: tuple[Chunk, ...], parts: list[bytes]) -> int:
        """Write the chunks of `batch` that still meet a hole (I/O thread).

        Asked right before writing, not only when the background write began: a READ
        (which writes whole chunks) may have written some of them since.
        """
        by_offset = {c.offset: part for c, part in zip(batch, parts, strict=True)}
        n = 0
        with self._write_lock(fd):
            gaps = cachedir.holes(fd, batch[0].offset, _round_up(batch[-1].end))
            for run in windows(in_holes(batch, gaps), BACKGROUND_BATCH):
                data = [by_offset[c.offset] for c in run]
                n += int(self.backend.fill_parts(fd, data, run[0].offset, 0, complete=False))
        return n

    def _write_lock(self, fd: int) -> threading.Lock:
        return self._write_locks.setdefault(fd, threading.Lock())  # atomic in CPython

    # -- lifecycle -------------------------------------------------------------------

    def keep(self, object_ids: set[int]) -> None:
        """Forget the chunk tables of objects that are closed (a few spare are kept)."""
        if len(self.blobs) > 2 * len(object_ids) + 8:
            self.blobs = {k: v for k, v in self.blobs.items() if k in object_ids}

    def pending(self) -> set[Any]:
        """What still runs: READ tasks and batch jobs (for the drain).

        A job whose thread is stuck in a read past the deadline is not waited for: its
        READ is answered and the READs it had not begun moved to another job.
        """
        return set(self._tasks) | {asyncio.wrap_future(j) for j in self._jobs
                                   if j not in self._stuck_jobs}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _in_thread(self, job: Callable[[], T]) -> T:
        """Run `job` in the pool; if cancelled, still let it finish (the kernel waits on it)."""
        fut = asyncio.get_running_loop().run_in_executor(self._executor, job)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await fut
            raise


class CacheLimit:
    """`cache_max` over the kernel's cache files under `cache_dir` (allocated bytes).

    Background writes ask `used()` (a scan) before each group of writes and stop at the
    limit. A READ must be answered, so `room` keeps a running estimate (last scan plus
    what was let through since) and scans only near the limit; there, it has the kernel
    cull every cache file no object holds (`command`: the device's, see control/cull.py)
    before it says the cache is full.
    """

    def __init__(self, cache_dir: Path, cache_max: int,
                 command: cachedir.Command | None = None) -> None:
        self.cache_dir = cache_dir
        self.cache_max = cache_max
        self.command = command
        self._known = 0  # bytes cached, as far as this process knows

    def used(self) -> int:
        total = 0
        for f in cachedir.cache_files(self.cache_dir):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f.path, follow_symlinks=False).st_blocks * 512
        self._known = total
        return total

    def room(self, need: int) -> str | None:
        """None if `need` more bytes fit (counted as written), else why not (loop thread:
        culling changes the working directory)."""
        if self._known + need > self.cache_max and self.used() + need > self.cache_max:
            if self.command is not None:
                results = cachedir.cull(self.command, self.cache_dir,
                                        list(cachedir.cache_files(self.cache_dir)))
                culled = [r for r in results if r.outcome == "culled"]
                log.info("culled", reason="cache_max", files=len(culled),
                         bytes_freed=sum(r.bytes for r in culled))
            if self.used() + need > self.cache_max:
                return (f"cache full: {self._known} bytes cached and {need} more needed, "
                        f"above cache_max {self.cache_max}")
        self._known += need
        return None


class MetadataWalkError(ValueError):
    """The walk of a bootstrap's EROFS metadata gave up (not EROFS, malformed, or a layout
    erofs_meta.py does not follow); the message says where."""


async def metadata_of(fetcher: ChunkFetcher, blob: Blob,
                      in_thread: Callable[[Callable[[], Any]], Awaitable[Any]],
                      ) -> list[tuple[int, int]]:
    """The (start, end) ranges of `blob`'s EROFS metadata, read through `fetcher` (verified).

    The walk runs in a thread (`in_thread` runs a callable there); its reads fetch whole
    chunks on the loop and keep the last few. Shared by the fscache prefill and the fanotify
    mount, which both write only these ranges before the kernel reads the image.

    Raises:
        MetadataWalkError: the walk gave up.
    """
    loop = asyncio.get_running_loop()
    recent: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def read(off: int, length: int) -> bytes:  # I/O thread; fetches run on the loop
        need = blob.chunks_for(off, length)
        if not need or need[-1].end < off + length:
            msg = f"read of {off}+{length} past the blob's end"
            raise ValueError(msg)
        missing = tuple(c for c in need if c.offset not in recent)
        if missing:
            parts, _ = asyncio.run_coroutine_threadsafe(
                fetcher.get(blob, missing), loop).result()
            recent.update((c.offset, p) for c, p in zip(missing, parts, strict=True))
        for c in need:
            recent.move_to_end(c.offset)
        while len(recent) > max(8, len(need)):
            recent.popitem(last=False)
        first = need[0].offset
        if len(need) == 1:
            return recent[first][off - first : off - first + length]
        joined = b"".join(recent[c.offset] for c in need)
        return joined[off - first : off - first + length]

    try:
        ranges: list[tuple[int, int]] = await in_thread(
            functools.partial(metadata_ranges, read, blob.size))
    except (ValueError, IndexError, struct.error) as exc:
        raise MetadataWalkError(str(exc)) from None
    return ranges


def _intersect(ranges: list[tuple[int, int]], gaps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of sorted `ranges` that lie in sorted `gaps` (pure)."""
    out = []
    for s, e in ranges:
        for gs, ge in gaps:
            lo, hi = max(s, gs), min(e, ge)
            if lo < hi:
                out.append((lo, hi))
    return out


_ORDER = {"zero": 0, "cache": 1, "joined": 2, "local": 3, "remote": 4}


def _farthest(a: str, b: str) -> str:
    return a if _ORDER.get(a, 0) >= _ORDER.get(b, 0) else b


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE
