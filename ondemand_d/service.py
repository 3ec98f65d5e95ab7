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
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ondemand_d import protocol, wire
from ondemand_d._native import Backend
from ondemand_d.errors import BadKey, ProtocolError, StoreError, UnknownName
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import PAGE, Blob

log = structlog.get_logger()

#: Bytes written per anon-fd write while prefilling a whole blob.
PREFILL_BATCH = 8 << 20


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
        on_status: Callable[[str], None] | None = None,
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
        self._on_status = on_status
        self._tasks: set[asyncio.Task[None]] = set()
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
            self._dispatch(buf)

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
        if exc.msg_id is None or len(buf) < wire.HEADER_SIZE:
            return
        opcode = int.from_bytes(buf[4:8], "little" if wire._E == "<" else "big")  # noqa: SLF001
        if opcode == wire.Opcode.OPEN:
            self._copen(exc.msg_id, -errno.EINVAL)
            if len(buf) >= wire.OPEN_FIXED_SIZE:  # the fd is ours even if the keys are bad
                fd = int.from_bytes(buf[24:28], "little" if wire._E == "<" else "big")  # noqa: SLF001
                _close_quietly(fd)

    # -- carrying out actions -----------------------------------------------------

    def _perform(self, actions: list[protocol.Action]) -> None:
        for action in actions:
            if isinstance(action, protocol.Lookup):
                self._spawn(self._lookup(action))
            elif isinstance(action, protocol.Copen):
                self._copen(action.msg_id, action.size)
            elif isinstance(action, protocol.Fill):
                self._spawn(self._fill(action))
            elif isinstance(action, protocol.Prefill):
                self._spawn(self._prefill(action))
            elif isinstance(action, protocol.CloseFd):
                _close_quietly(action.fd)
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

    def _copen(self, msg_id: int, size: int) -> None:
        try:
            self.device.copen(msg_id, size)
        except OSError as exc:
            # EINVAL: the OPEN was cancelled (object dropped); nothing waits on it.
            log.warning("copen_failed", msg_id=msg_id, size=size, errno=exc.errno)

    async def _lookup(self, action: protocol.Lookup) -> None:
        start = time.perf_counter()
        key = _text(action.cookie_key)
        blob: Blob | None = None
        bootstrap = False
        try:
            blob, bootstrap = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._resolve, action.cookie_key
            )
            size, outcome = blob.size, "ok"
        except BadKey as exc:
            size, outcome, error = -errno.ENOENT, "bad_key", str(exc)
        except UnknownName as exc:
            size, outcome, error = -errno.ENOENT, "unknown", str(exc)
        except (StoreError, OSError) as exc:
            size, outcome, error = -errno.EIO, "store_error", str(exc)
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

    def _resolve(self, key: bytes) -> tuple[Blob, bool]:
        blob = self.store.resolve(key)
        return blob, self.store.has_image(key.decode())

    async def _fill(self, action: protocol.Fill) -> None:
        start = time.perf_counter()
        self.counters.reads += 1
        fields: dict[str, Any] = {
            "op": "READ", "msg_id": action.msg_id, "object_id": action.object_id,
            "blob": action.blob_id, "off": action.off, "len": action.len,
        }
        completed = [False]  # set by the writer thread once the READ is completed
        try:
            written, chunks, source = await self._write_range(action, completed)
        except (StoreError, OSError) as exc:
            self.counters.reads_failed += 1
            self._complete_without_data(action)
            log.warning(
                "read_completed", **fields, outcome="eio", error=str(exc),
                error_type=type(exc).__name__, duration_ms=_ms(start),
            )
        except BaseException:
            self.counters.reads_failed += 1
            if not completed[0]:
                self._complete_without_data(action)
            raise
        else:
            self.counters.bytes_written += written
            log.info(
                "read_completed", **fields, chunks=chunks, bytes=written, source=source,
                outcome="ok", duration_ms=_ms(start),
            )
        finally:
            self._perform(self.objects.read_done(action.msg_id))
            self._resume()

    async def _write_range(
        self, action: protocol.Fill, completed: list[bool]
    ) -> tuple[int, int, str]:
        """Fetch the whole chunks around the range, verify, write, complete."""
        blob = self.store.get_blob(action.blob_id)
        chunks = blob.chunks_for(action.off, action.len)
        log.debug("read_chunks", msg_id=action.msg_id, chunks=[c.digest[:12] for c in chunks])
        if chunks:
            parts, source = await self.fetcher.get(blob, chunks)
            start = chunks[0].offset
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        else:
            # Past the blob's end: the kernel still needs the range present.
            start, data, source = action.off - action.off % PAGE, b"", "zero"
        # Zero-pad to the end of the asked range if it lies past the blob's end.
        want_end = _round_up(action.off + action.len)
        if start + len(data) < want_end and start + len(data) >= blob.size:
            data += bytes(want_end - start - len(data))
        log.debug("read_writing", msg_id=action.msg_id, at=start, bytes=len(data), source=source)

        def write_and_complete() -> None:
            self.backend.fill(action.fd, data, start, action.msg_id, complete=True)
            completed[0] = True

        await self._in_thread(write_and_complete)
        return _round_up(len(data)), len(chunks), source

    async def _in_thread(self, job: Callable[[], None]) -> None:
        """Run `job` in the pool; if cancelled, still let it finish (the kernel waits on it)."""
        fut = asyncio.get_running_loop().run_in_executor(self._executor, job)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await fut
            raise

    def _complete_without_data(self, action: protocol.Fill) -> None:
        try:
            self.backend.complete(action.fd, action.msg_id)
        except OSError as exc:
            log.warning("complete_failed", msg_id=action.msg_id, errno=exc.errno)

    async def _prefill(self, action: protocol.Prefill) -> None:
        """Write a whole blob so the kernel never has to ask for it."""
        start = time.perf_counter()
        blob = self.store.get_blob(action.blob_id)
        written = 0
        try:
            batch: list[Any] = []
            for i, chunk in enumerate(blob.chunks):
                batch.append(chunk)
                size = sum(c.length for c in batch)
                if size < PREFILL_BATCH and i < len(blob.chunks) - 1:
                    continue
                parts, _ = await self.fetcher.get(blob, batch)
                data = b"".join(parts)
                at = batch[0].offset
                await self._in_thread(
                    lambda d=data, a=at: self.backend.fill(action.fd, d, a, 0, complete=False)
                )
                written += _round_up(len(data))
                batch = []
        except (StoreError, OSError) as exc:
            log.warning(
                "prefilled", object_id=action.object_id, blob=blob.blob_id, bytes=written,
                outcome="error", error=str(exc), duration_ms=_ms(start),
            )
            return
        self.counters.bytes_written += written
        log.info(
            "prefilled", object_id=action.object_id, blob=blob.blob_id, bytes=written,
            outcome="ok", duration_ms=_ms(start),
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
        pending = set(self._tasks)
        if pending:
            log.info("draining", tasks=len(pending), timeout_s=timeout)
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self._perform(self.objects.drain())


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
