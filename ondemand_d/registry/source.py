# SPDX-License-Identifier: Apache-2.0
"""RegistrySource: the daemon's RemoteSource for chunks that live in registry blobs.

`fetch(blob, chunks)` groups the chunks by registry blob, merges runs that are
adjacent in that blob into one Range GET (up to `max_range` bytes), sends the
runs concurrently under the per-registry limit, and returns each chunk's bytes
only after decompressing it and checking its sha256. Nothing is cached here:
the caller (the lead's ChunkFetcher) does single-flight and write-through.

Prefetch priority: a fetch at priority "prefetch" queues behind every demand
request of the same registry, uses at most `prefetch_concurrency` slots, and is
held to `prefetch_bandwidth` bytes/s. Ask for it in one of two ways:

* ``fetch(blob, chunks, priority="prefetch")``, or
* ``with source.prefetching(): ...`` around code that reaches `fetch` through
  layers that do not pass a priority (the ChunkFetcher): it sets a context
  variable, so it applies to the current task only.

`prefetch(blob, fetch=...)` walks a whole blob in windows at that priority and
logs progress; the service starts it as a task after an OPEN and cancels it on
CLOSE or shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import zstandard

from ondemand_d.errors import ChunkNotFound, DigestMismatch, FetchError, StoreError
from ondemand_d.registry._limiter import Priority, TokenBucket
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig, default_docker_config
from ondemand_d.store.model import Blob, Chunk, RemoteRange

log = structlog.get_logger()
#: The priority of fetches that do not name one; see RegistrySource.prefetching.
current_priority: contextvars.ContextVar[Priority] = contextvars.ContextVar(
    "ondemand_d_registry_priority", default="demand"
)
#: Runs at least this big are decompressed and hashed off the event loop.
OFFLOAD_BYTES = 256 << 10
#: Log a prefetch progress line at most this often.
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class _Run:
    """One Range GET: a contiguous stretch of one registry blob and the chunks in it."""

    layer: str
    offset: int
    length: int
    members: tuple[int, ...]  # indexes into the caller's chunk list


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    blob_id: str
    chunks: int
    bytes: int
    duration_s: float
    error: str | None = None


def remote_location(blob: Blob) -> tuple[str, str]:
    """(registry, repository) of a blob located for an image (store/locations.py).

    Raises:
        FetchError: the blob was not added from a registry, or no location of
            the image reading it is known (not retryable).
    """
    remote: Any = blob.extra.get("remote")
    if not isinstance(remote, dict) or "registry" not in remote or "repository" not in remote:
        why = blob.extra.get("unlocated")
        msg = f"blob {blob.blob_id} has no registry location" + (f": {why}" if why else "")
        raise FetchError(msg, retryable=False)
    return str(remote["registry"]), str(remote["repository"])


def plan(chunks: Sequence[Chunk], max_range: int) -> list[_Run]:
    """Merge chunks that are adjacent in the same registry blob into runs (pure)."""
    remotes = [_remote(c) for c in chunks]
    order = sorted(range(len(chunks)), key=lambda i: (remotes[i].blob, remotes[i].offset))
    runs: list[_Run] = []
    for i in order:
        r = remotes[i]
        if runs:
            last = runs[-1]
            end = last.offset + last.length
            same = last.layer == r.blob
            if same and remotes[last.members[-1]] == r:  # the same bytes, asked twice
                runs[-1] = _Run(last.layer, last.offset, last.length, (*last.members, i))
                continue
            if same and r.offset == end and last.length + r.length <= max_range:
                runs[-1] = _Run(last.layer, last.offset, last.length + r.length, (*last.members, i))
                continue
        runs.append(_Run(r.blob, r.offset, r.length, (i,)))
    return runs


def _remote(chunk: Chunk) -> RemoteRange:
    if chunk.remote is None:
        msg = f"chunk {chunk.digest} at {chunk.offset} has no remote source"
        raise ChunkNotFound(msg)
    return chunk.remote


def decode(blob: Blob, chunk: Chunk, raw: bytes | memoryview) -> bytes:
    """Decompress one chunk's registry bytes and verify them; DigestMismatch if wrong."""
    where = f"blob {blob.blob_id} offset {chunk.offset} (chunk {chunk.digest})"
    compression = _remote(chunk).compression
    if compression == "zstd":
        try:
            size = zstandard.get_frame_parameters(raw).content_size
            if size != chunk.length:  # also refuses frames that claim a huge size
                msg = f"{where}: zstd frame holds {size} bytes, expected {chunk.length}"
                raise DigestMismatch(msg)
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=chunk.length)
        except zstandard.ZstdError as exc:
            msg = f"{where}: not a valid zstd frame ({exc})"
            raise DigestMismatch(msg) from None
    elif compression == "none":
        data = bytes(raw)
    else:
        msg = f"{where}: unknown compression {compression!r}"
        raise FetchError(msg, retryable=False)
    if len(data) != chunk.length or hashlib.sha256(data).hexdigest() != chunk.digest:
        msg = f"{where}: registry bytes do not match the chunk digest"
        raise DigestMismatch(msg)
    return data


class RegistrySource:
    """RemoteSource over OCI registries. One per daemon; safe for concurrent use."""

    def __init__(self, config: RegistryConfig, client: RegistryClient | None = None) -> None:
        self.config = config
        self.client = client or RegistryClient(config)
        self._bucket = TokenBucket(config.prefetch_bandwidth)
        self.mismatches = 0
        self.chunks_fetched = 0

    @property
    def bytes_fetched(self) -> int:
        """Body bytes received from registries for chunk ranges (the wire, compressed)."""
        return self.client.bytes_received

    def stats(self) -> dict[str, int]:
        """Counters for the daemon's STATUS line and logs."""
        return {
            "registry_requests": self.client.requests,
            "registry_bytes": self.client.bytes_received,
            "registry_chunks": self.chunks_fetched,
            "registry_mismatches": self.mismatches,
        }

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(
        self, blob: Blob, chunks: Sequence[Chunk], priority: Priority | None = None
    ) -> list[bytes]:
        """Each chunk's uncompressed, verified bytes, in the order given.

        Raises:
            FetchError: the registry could not deliver (retryable or not).
            DigestMismatch: the registry delivered wrong bytes (logged with blob and offset).
            ChunkNotFound: a chunk has no remote range.
        """
        if not chunks:
            return []
        priority = priority or current_priority.get()
        registry, repository = remote_location(blob)
        runs = plan(chunks, self.config.max_range)
        out: list[bytes | None] = [None] * len(chunks)

        async def one(run: _Run) -> None:
            if priority == "prefetch":
                await self._bucket.take(run.length)
            raw = await self.client.get_range(
                registry, repository, run.layer, run.offset, run.length, priority
            )
            pieces = []
            view = memoryview(raw)  # slices without copies
            for i in run.members:
                r = _remote(chunks[i])
                pieces.append((i, view[r.offset - run.offset : r.offset - run.offset + r.length]))
            if run.length >= OFFLOAD_BYTES:
                # zstd and sha256 release the GIL: big runs decode on another core
                # and the loop keeps serving other READs meanwhile.
                await asyncio.to_thread(self._decode_all, blob, chunks, pieces, out, registry)
            else:
                self._decode_all(blob, chunks, pieces, out, registry)

        start = time.monotonic()
        deadline = self.config.fetch_deadline
        try:
            async with asyncio.timeout(deadline if priority == "demand" else None):
                await _all_or_nothing([one(run) for run in runs])
        except TimeoutError:
            msg = f"blob {blob.blob_id}: {len(chunks)} chunk(s) not fetched within {deadline:g} s"
            raise FetchError(msg, retryable=True) from None
        log.debug(
            "registry_chunks_fetched",
            blob=blob.blob_id,
            chunks=len(chunks),
            requests=len(runs),
            len=sum(r.length for r in runs),
            priority=priority,
            duration_ms=round((time.monotonic() - start) * 1000, 1),
        )
        return [b for b in out if b is not None]

    def _decode_all(
        self,
        blob: Blob,
        chunks: Sequence[Chunk],
        pieces: list[tuple[int, memoryview]],
        out: list[bytes | None],
        registry: str,
    ) -> None:
        for i, piece in pieces:
            c = chunks[i]
            try:
                out[i] = decode(blob, c, piece)
                self.chunks_fetched += 1
            except DigestMismatch as exc:
                self.mismatches += 1
                log.warning(
                    "chunk_digest_mismatch",
                    blob=blob.blob_id,
                    off=c.offset,
                    digest=c.digest,
                    registry=registry,
                    layer=_remote(c).blob,
                    reason=str(exc),
                )
                raise

    @staticmethod
    @contextlib.contextmanager
    def prefetching() -> Iterator[None]:
        """Within this block (this task only), fetches default to prefetch priority."""
        token = current_priority.set("prefetch")
        try:
            yield
        finally:
            current_priority.reset(token)

    async def prefetch(
        self,
        blob: Blob,
        *,
        fetch: Callable[[Sequence[Chunk]], Awaitable[object]] | None = None,
        have: Callable[[Chunk], bool] | None = None,
    ) -> PrefetchResult:
        """Read a whole blob at prefetch priority, window by window, in blob order.

        Args:
            blob: a blob written by `add`.
            fetch: called with each window of chunks; the service passes its
                ChunkFetcher (with priority="prefetch") so single-flight and
                write-through apply. Default: this source's `fetch` at prefetch
                priority (bytes are verified and dropped: only useful to warm caches).
            have: chunks for which it returns True are skipped (already local).

        Returns:
            What was fetched; a failure ends the prefetch, is logged and is
            reported in `error` rather than raised (prefetch is best-effort).
            Cancellation is not caught.
        """
        fetch = fetch or (lambda group: self.fetch(blob, group, priority="prefetch"))
        todo = [c for c in blob.chunks if c.remote is not None and not (have and have(c))]
        total = sum(c.length for c in todo)
        done = n = 0
        start = last_log = time.monotonic()
        log.info("prefetch_started", blob=blob.blob_id, chunks=len(todo), len=total)
        error: str | None = None
        try:
            for window in windows(todo, self.config.max_range):
                await fetch(window)
                done += sum(c.length for c in window)
                n += len(window)
                if time.monotonic() - last_log >= PROGRESS_EVERY_S:
                    last_log = time.monotonic()
                    log.info(
                        "prefetch_progress",
                        blob=blob.blob_id,
                        done=done,
                        len=total,
                        percent=round(100 * done / max(total, 1), 1),
                    )
        except (StoreError, OSError) as exc:
            error = str(exc)
            log.warning("prefetch_failed", blob=blob.blob_id, done=done, len=total, reason=error)
        result = PrefetchResult(blob.blob_id, n, done, time.monotonic() - start, error)
        if error is None:
            log.info(
                "prefetch_completed",
                blob=blob.blob_id,
                chunks=n,
                len=done,
                duration_ms=round(result.duration_s * 1000),
            )
        return result


def windows(chunks: Sequence[Chunk], max_bytes: int) -> Iterator[tuple[Chunk, ...]]:
    """Consecutive groups of chunks of at most `max_bytes` (at least one chunk each)."""
    group: list[Chunk] = []
    size = 0
    for c in chunks:
        if group and size + c.length > max_bytes:
            yield tuple(group)
            group, size = [], 0
        group.append(c)
        size += c.length
    if group:
        yield tuple(group)


async def _all_or_nothing(coros: list[Awaitable[None]]) -> None:
    """Run concurrently; on the first failure cancel the rest and raise that failure."""
    if len(coros) == 1:
        await coros[0]
        return
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            raise exc


def make_source(config: RegistryConfig | dict[str, Any] | object | None = None) -> RegistrySource:
    """The factory the daemon calls. Creating the source does no I/O.

    Accepts a RegistryConfig, a ``[registry]`` TOML table (dict), or the daemon's own Config
    (its ``registry`` table). A ``docker_config`` left unset means Docker's own default
    location (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``).
    """
    if config is None:
        config = RegistryConfig()
    elif isinstance(config, dict):
        config = RegistryConfig.from_mapping(config)
    elif not isinstance(config, RegistryConfig):
        config = config.registry  # type: ignore[attr-defined]
        if config.docker_config is None:
            config = dataclasses.replace(config, docker_config=default_docker_config())
    return RegistrySource(config)
