# SPDX-License-Identifier: Apache-2.0
"""Getting verified chunk bytes for a READ: local store, remote source, single-flight.

Every chunk handed out here has been hashed and compared with its digest in
this process, just now: nothing is trusted because of where it came from.
Concurrent requests for one digest from one place (the chunk's registry and
repository: see store/locations.py) share one fetch, across blobs and images;
a READ never waits on a fetch from a registry its own image did not choose;
the fetch belongs to this module, not to the caller that started it, so one
caller's cancellation never fails another's READ, and a caller that joins
another's fetch still waits no longer than the fetch deadline.
"""
from __future__ import annotations

import asyncio
import collections
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

import structlog

from ondemand_d.errors import ChunkNotFound, DigestMismatch, FetchError, StoreError
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk

log = structlog.get_logger()
#: What one fetch is for: a digest, and the registry and repository it comes from.
FlightKey = tuple[str, str, str]


def flight_key(chunk: Chunk) -> FlightKey:
    """Chunks with one key share a fetch; a chunk located elsewhere never joins it."""
    remote = chunk.remote
    if remote is None:
        return (chunk.digest, "", "")
    return (chunk.digest, remote.registry, remote.repository)


class Claim:
    """One caller's chunks: bytes already known, chunks it must produce, chunks others produce.

    Made by `ChunkFetcher.claim` on the loop thread; only the fetcher reads or
    changes what is inside. A caller asks `read_owned` (any thread) and then,
    on the loop, either `settle` (everything was local) or `finish` (fetch the
    rest and wait for the joined chunks).
    """

    __slots__ = ("_data", "_flying", "_joined", "_owned", "_read", "chunks", "reading", "source",
                 "stage", "stuck_on")

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.chunks = tuple(chunks)
        self._data: list[bytes | None] = [None] * len(self.chunks)
        self._owned: list[tuple[int, asyncio.Future[bytes]]] = []
        self._joined: list[tuple[int, asyncio.Future[bytes]]] = []
        self._read = False  # read_owned ran
        self._flying: set[int] = set()  # owned chunks a fetch task now answers for
        self.source = "cache"  # where the bytes came from, the farthest one used
        self.stage = "local"  # what it waits for now: local (store), fetch (remote), joined
        self.reading: Chunk | None = None  # the chunk whose file is being read (any thread)
        self.stuck_on: Chunk | None = None  # its read passed the deadline, not yet returned

    @property
    def owned(self) -> int:
        return len(self._owned)

    @property
    def joined(self) -> int:
        return len(self._joined)

    @property
    def cached(self) -> int:
        return len(self.chunks) - len(self._owned) - len(self._joined)

    @property
    def needs_loop(self) -> bool:
        """Whether bytes must come from other callers' fetches (then use `finish`)."""
        return bool(self._joined)

    def parts(self) -> list[bytes]:
        """Every chunk's verified bytes, in order (once the claim is complete)."""
        if any(d is None for d in self._data):
            msg = "claim is not complete"
            raise StoreError(msg)
        return self._data  # type: ignore[return-value]


class RemoteSource(Protocol):
    """Where chunks with a `remote` range come from (e.g. an OCI registry)."""

    async def fetch(self, blob: Blob, chunks: Sequence[Chunk]) -> list[bytes]:
        """Each chunk's uncompressed bytes, verified against its digest, in order."""
        ...

    async def aclose(self) -> None: ...


class ChunkFetcher:
    """Verified chunk bytes by digest, fetched once however many READs want them.

    Args:
        store: the local store; chunks present there are read from it.
        executor: runs the blocking read + hash of local chunks.
        remote: source for chunks the local store lacks and that carry a remote range.
        write_through: keep chunks fetched remotely in the local store.
        cache_bytes: size of a small cache of recently verified chunks, so
            overlapping READs that arrive one after the other hash once.
        deadline: seconds a caller waits for chunks another caller is fetching
            (the registry's fetch deadline; None: no limit).
        local_timeout: seconds a read of the local store may take before the caller's
            READ fails (a store on a hung NFS or FUSE filesystem; None: no limit).
    """

    def __init__(
        self,
        store: LocalStore,
        executor: Executor,
        remote: RemoteSource | None = None,
        *,
        write_through: bool = False,
        cache_bytes: int = 64 << 20,
        deadline: float | None = None,
        local_timeout: float | None = None,
    ) -> None:
        self.store = store
        self.remote = remote
        self.write_through = write_through
        self._executor = executor
        self._inflight: dict[FlightKey, asyncio.Future[bytes]] = {}
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._cache_bytes = cache_bytes
        self.deadline = deadline
        self._joiners: collections.Counter[FlightKey] = collections.Counter()
        self._flights: set[asyncio.Task[list[bytes]]] = set()
        self.fetches = 0  # chunk fetches actually started (not joined or cached)
        self.local_timeout = local_timeout
        # Digests whose file a read past the deadline is still stuck in (how many): a
        # thread stuck in the kernel cannot be interrupted, so no other read of that file
        # starts and takes another I/O thread until it returns. Changed on the loop only.
        self._stuck: collections.Counter[str] = collections.Counter()
        self.stuck_reads = 0  # I/O threads now stuck in a local read past the deadline

    def claim(self, chunks: Sequence[Chunk]) -> Claim:
        """Sort `chunks` into cached, ours to produce, and being produced by another caller.

        Call on the loop thread. The caller must `settle` or `finish` the claim.
        """
        claim = Claim(chunks)
        loop = asyncio.get_running_loop()
        for i, chunk in enumerate(claim.chunks):
            cached = self._recent.get(chunk.digest)
            if cached is not None and len(cached) == chunk.length:
                self._recent.move_to_end(chunk.digest)
                claim._data[i] = cached
                continue
            key = flight_key(chunk)
            fut = self._inflight.get(key)
            if fut is None:
                fut = loop.create_future()
                self._inflight[key] = fut
                claim._owned.append((i, fut))
            else:
                self._joiners[key] += 1
                claim._joined.append((i, fut))
        self.fetches += len(claim._owned)
        return claim

    def read_owned(self, claim: Claim) -> bool:
        """Read and verify the claim's own chunks from the local store (blocking; any thread).

        Returns True when every chunk the claim owns is now known; False when
        some must come from the remote source (`finish` fetches them).

        Raises:
            StoreError: a chunk is missing or damaged and has no remote source.
        """
        claim._read = True
        wanted = [(i, claim.chunks[i]) for i, _ in claim._owned]
        got = self.read_local([c for _, c in wanted], claim)
        for (i, _), data in zip(wanted, got, strict=True):
            claim._data[i] = data
        if wanted:
            claim.source = "local"
        return all(d is not None for d in got)

    def settle(self, claim: Claim, exc: BaseException | None = None) -> None:
        """Hand the claim's own chunks (or its failure) to every caller waiting on them.

        Loop thread. Chunks still unknown (remote) are left for `finish`.
        """
        for i, fut in claim._owned:
            if fut.done() or i in claim._flying:
                continue
            chunk = claim.chunks[i]
            data = claim._data[i]
            if exc is not None:
                self._fail(flight_key(chunk), fut, exc)
            elif data is not None:
                self._inflight.pop(flight_key(chunk), None)
                self._remember(chunk.digest, data)
                fut.set_result(data)

    async def finish(self, blob: Blob, claim: Claim) -> list[bytes]:
        """Fetch what the claim owns and the store lacks, wait for the joined chunks.

        The remote fetch runs as a task of its own: if this caller is cancelled
        while another caller waits for one of its chunks, the fetch goes on for
        them. Joined chunks are waited for at most `deadline` seconds, whoever
        fetches them (a prefetch has none of its own).

        Raises:
            StoreError: a chunk is missing, corrupt or could not be fetched in time.
        """
        try:
            if claim._owned and not claim._read:
                await self._read_owned_in_time(claim)
            self.settle(claim)
            missing = [(i, fut) for i, fut in claim._owned
                       if claim._data[i] is None]
            if missing:
                claim.stage, claim.source = "fetch", "remote"
                await self._fetch_missing(blob, claim, missing)
        except BaseException as exc:
            self.settle(claim, exc)
            self._leave(claim)
            raise
        try:
            await self._wait_joined(claim)
        finally:
            self._leave(claim)
        return claim.parts()

    async def _read_owned_in_time(self, claim: Claim) -> None:
        """`read_owned` on the I/O pool, waited for at most `local_timeout` seconds.

        Past it the caller fails; the thread's late result is dropped (the claim is
        settled with the failure by then, and only the caller writes what a claim read).
        """
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.read_owned, claim)
        try:
            async with asyncio.timeout(self.local_timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            error = self.read_stuck(claim)
            fut.add_done_callback(lambda f: self.read_returned(claim, f))
            raise error from None

    def read_stuck(self, claim: Claim) -> StoreError:
        """Count and log a local read of `claim` past the deadline; the error for its READ.

        Loop thread. A thread stuck in the kernel cannot be interrupted: it stays stuck
        until the read returns, then `read_returned` uncounts it. A claim whose read never
        began (every I/O thread busy) is not counted: no file is to blame.
        """
        chunk = claim.reading
        if chunk is None:
            msg = (f"no I/O thread was free to read the local store within "
                   f"{self.local_timeout:g} s ({self.stuck_reads} stuck in reads)")
            log.warning("local_read_stuck", chunk=None, timeout_s=self.local_timeout,
                        stuck_threads=self.stuck_reads, error=msg)
            return StoreError(msg)
        claim.stuck_on = chunk
        name = getattr(self.store, "chunk_path", None)  # a store without files names none
        path = name(chunk.digest) if name is not None else "?"
        self._stuck[chunk.digest] += 1
        self.stuck_reads += 1
        log.warning("local_read_stuck", chunk=chunk.digest, file=str(path),
                    timeout_s=self.local_timeout, stuck_threads=self.stuck_reads,
                    error="the store may be on a hung filesystem (NFS, FUSE)")
        msg = (f"chunk {chunk.digest}: reading its file {path} did not return within "
               f"{self.local_timeout:g} s; the store may be on a hung filesystem (NFS, FUSE)")
        return StoreError(msg)

    def read_returned(self, claim: Claim, _fut: object = None) -> None:
        """The late read of `claim` returned (loop thread): uncounted, its bytes dropped."""
        chunk, claim.stuck_on = claim.stuck_on, None
        if chunk is None:
            return
        self._stuck[chunk.digest] -= 1
        if self._stuck[chunk.digest] <= 0:
            del self._stuck[chunk.digest]
        self.stuck_reads -= 1
        log.info("local_read_returned", chunk=chunk.digest, stuck_threads=self.stuck_reads,
                 outcome="dropped: its READ was answered at the deadline")

    async def _fetch_missing(
        self, blob: Blob, claim: Claim, missing: list[tuple[int, asyncio.Future[bytes]]]
    ) -> None:
        chunks = [claim.chunks[i] for i, _ in missing]
        claim._flying.update(i for i, _ in missing)  # the task settles them, whoever waits
        task = asyncio.get_running_loop().create_task(
            self._flight(blob, chunks, [f for _, f in missing]))
        self._flights.add(task)
        task.add_done_callback(self._flights.discard)
        try:
            data = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() and not any(self._joiners[flight_key(c)] for c in chunks):
                task.cancel()  # nobody else waits for these chunks
            raise
        for (i, _), d in zip(missing, data, strict=True):
            claim._data[i] = d

    async def _flight(
        self, blob: Blob, chunks: list[Chunk], futures: list[asyncio.Future[bytes]]
    ) -> list[bytes]:
        """One remote fetch; its result (or failure) goes to every caller waiting on it."""
        try:
            data = await self._fetch_remote(blob, chunks)
        except BaseException as exc:
            failure: BaseException = exc
            if isinstance(exc, asyncio.CancelledError):
                failure = FetchError(f"blob {blob.blob_id}: fetch cancelled", retryable=True)
            for chunk, fut in zip(chunks, futures, strict=True):
                self._fail(flight_key(chunk), fut, failure)
            raise
        for chunk, fut, d in zip(chunks, futures, data, strict=True):
            self._inflight.pop(flight_key(chunk), None)
            self._remember(chunk.digest, d)
            if not fut.done():
                fut.set_result(d)
        return data

    async def _wait_joined(self, claim: Claim) -> None:
        if not claim._joined:
            return
        if claim.source == "cache":
            claim.source = "joined"
        claim.stage = "joined"
        try:
            async with asyncio.timeout(self.deadline):
                for i, fut in claim._joined:
                    claim._data[i] = await asyncio.shield(fut)
        except TimeoutError:
            msg = (f"{claim.joined} chunk(s) another fetch was getting did not arrive "
                   f"within {self.deadline:g} s")
            raise FetchError(msg, retryable=True) from None

    def _leave(self, claim: Claim) -> None:
        for i, _ in claim._joined:
            key = flight_key(claim.chunks[i])
            self._joiners[key] -= 1
            if self._joiners[key] <= 0:
                del self._joiners[key]

    def _fail(self, key: FlightKey, fut: asyncio.Future[bytes], exc: BaseException) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.done():
            fut.set_exception(exc)
            fut.exception()  # retrieved: joiners re-raise it themselves

    def read_local(self, chunks: Sequence[Chunk], claim: Claim | None = None,
                   ) -> list[bytes | None]:
        """Read and verify chunks from the local store (blocking; any thread).

        A chunk missing or damaged locally but fetchable remotely comes back as
        None (with write-through, the fetched bytes then replace the damaged file).
        `claim.reading` names the chunk being read (for the deadline's log line).

        Raises:
            StoreError: also when a read of a chunk's file is still stuck past the deadline.
        """
        out: list[bytes | None] = []
        for chunk in chunks:
            if chunk.digest in self._stuck:
                path = self.store.chunk_path(chunk.digest)
                msg = (f"chunk {chunk.digest}: an earlier read of its file {path} is still "
                       "stuck; the store may be on a hung filesystem (NFS, FUSE)")
                raise StoreError(msg)
            if claim is not None:
                claim.reading = chunk
            try:
                out.append(self.store.read_chunk(chunk))
            except (ChunkNotFound, DigestMismatch):
                if chunk.remote is None or self.remote is None:
                    raise
                out.append(None)
        return out

    async def get(self, blob: Blob, chunks: Sequence[Chunk]) -> tuple[list[bytes], str]:
        """The verified bytes of `chunks` of `blob`, and where they came from.

        Returns:
            (data per chunk, source) with source "cache", "local", "remote" or
            "joined" (another caller was already fetching it), the farthest one used.

        Raises:
            StoreError: a chunk is missing, corrupt or could not be fetched.
        """
        claim = self.claim(chunks)
        return await self.finish(blob, claim), claim.source

    async def aclose(self) -> None:
        """Cancel the fetches still running (at shutdown, after the READs ended)."""
        for task in list(self._flights):
            task.cancel()
        if self._flights:
            await asyncio.wait(list(self._flights))

    async def _fetch_remote(self, blob: Blob, chunks: list[Chunk]) -> list[bytes]:
        if self.remote is None:  # pragma: no cover - read_local raised already
            msg = f"blob {blob.blob_id}: chunks are remote but no remote source is configured"
            raise StoreError(msg)
        data = await self.remote.fetch(blob, chunks)
        if self.write_through:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._keep, chunks, data)
        return data

    def _keep(self, chunks: list[Chunk], data: list[bytes]) -> None:
        for chunk, payload in zip(chunks, data, strict=True):
            try:
                self.store.put_chunk(payload, chunk.digest)
            except (OSError, StoreError) as exc:  # a full disk must not fail the READ
                log.warning("write_through_failed", digest=chunk.digest, error=str(exc))

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self._cache_bytes // 4:
            return
        if digest in self._recent:
            return
        self._recent[digest] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > self._cache_bytes:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old)
