# SPDX-License-Identifier: Apache-2.0
"""Getting verified chunk bytes for a READ: local store, remote source, single-flight.

Every chunk handed out here has been hashed and compared with its digest in
this process, just now: nothing is trusted because of where it came from.
Concurrent requests for one digest share one fetch, across blobs and images.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Protocol

import structlog

from ondemand_d.errors import ChunkNotFound, StoreError
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk

log = structlog.get_logger()


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
    """

    def __init__(
        self,
        store: LocalStore,
        executor: Executor,
        remote: RemoteSource | None = None,
        *,
        write_through: bool = False,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.store = store
        self.remote = remote
        self.write_through = write_through
        self._executor = executor
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._cache_bytes = cache_bytes
        self.fetches = 0  # chunk fetches actually started (not joined or cached)

    async def get(self, blob: Blob, chunks: Sequence[Chunk]) -> tuple[list[bytes], str]:
        """The verified bytes of `chunks` of `blob`, and where they came from.

        Returns:
            (data per chunk, source) with source "cache", "local", "remote" or
            "joined" (another READ was already fetching it), the farthest one used.

        Raises:
            StoreError: a chunk is missing, corrupt or could not be fetched.
        """
        results: list[bytes | None] = [None] * len(chunks)
        waits: list[tuple[int, asyncio.Future[bytes]]] = []
        mine: list[tuple[int, Chunk, asyncio.Future[bytes]]] = []
        sources: set[str] = set()
        loop = asyncio.get_running_loop()
        for i, chunk in enumerate(chunks):
            cached = self._recent.get(chunk.digest)
            if cached is not None and len(cached) == chunk.length:
                self._recent.move_to_end(chunk.digest)
                results[i] = cached
                sources.add("cache")
                continue
            fut = self._inflight.get(chunk.digest)
            if fut is None:
                fut = loop.create_future()
                self._inflight[chunk.digest] = fut
                mine.append((i, chunk, fut))
            else:
                sources.add("joined")
            waits.append((i, fut))
        if mine:
            sources.add(await self._fetch_mine(blob, mine))
        for i, fut in waits:
            results[i] = await asyncio.shield(fut)
        order = ("remote", "local", "joined", "cache")
        source = next(s for s in order if s in sources) if sources else "none"
        return [r for r in results if r is not None], source

    async def _fetch_mine(
        self, blob: Blob, mine: list[tuple[int, Chunk, asyncio.Future[bytes]]]
    ) -> str:
        """Fetch the chunks this call owns and settle their futures; return the source."""
        self.fetches += len(mine)
        wanted = [c for _, c, _ in mine]
        source = "local"
        try:
            loop = asyncio.get_running_loop()
            got = await loop.run_in_executor(self._executor, self._read_local, wanted)
            missing = [c for c, data in zip(wanted, got, strict=True) if data is None]
            if missing:
                fetched = await self._fetch_remote(blob, missing)
                source = "remote"
                it = iter(fetched)
                got = [next(it) if data is None else data for data in got]
        except BaseException as exc:
            for _, chunk, fut in mine:
                self._inflight.pop(chunk.digest, None)
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: joiners re-raise it themselves
            raise
        for (_, chunk, fut), data in zip(mine, got, strict=True):
            assert data is not None  # noqa: S101 - filled above, for the type checker
            self._inflight.pop(chunk.digest, None)
            self._remember(chunk.digest, data)
            fut.set_result(data)
        return source

    def _read_local(self, chunks: list[Chunk]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for chunk in chunks:
            try:
                out.append(self.store.read_chunk(chunk))
            except ChunkNotFound:
                if chunk.remote is None or self.remote is None:
                    raise
                out.append(None)
        return out

    async def _fetch_remote(self, blob: Blob, chunks: list[Chunk]) -> list[bytes]:
        if self.remote is None:  # pragma: no cover - _read_local raised already
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
