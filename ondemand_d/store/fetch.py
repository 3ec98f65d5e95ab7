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
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from ondemand_d.errors import ChunkNotFound, DigestMismatch, StoreError
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk

log = structlog.get_logger()


@dataclass(slots=True)
class Claim:
    """One READ's chunks: bytes already known, futures it owns, futures it joins."""

    size: int
    data: list[bytes | None] = field(default_factory=list)
    owned: list[tuple[int, Chunk, asyncio.Future[bytes]]] = field(default_factory=list)
    joined: list[tuple[int, asyncio.Future[bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = [None] * self.size


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

    def claim(self, chunks: Sequence[Chunk]) -> Claim:
        """Sort `chunks` into cached, ours to fetch, and already being fetched by another READ.

        Call on the loop thread. The caller must `settle` what it owns.
        """
        claim = Claim(len(chunks))
        loop = asyncio.get_running_loop()
        for i, chunk in enumerate(chunks):
            cached = self._recent.get(chunk.digest)
            if cached is not None and len(cached) == chunk.length:
                self._recent.move_to_end(chunk.digest)
                claim.data[i] = cached
                continue
            fut = self._inflight.get(chunk.digest)
            if fut is None:
                fut = loop.create_future()
                self._inflight[chunk.digest] = fut
                claim.owned.append((i, chunk, fut))
            else:
                claim.joined.append((i, fut))
        self.fetches += len(claim.owned)
        return claim

    def settle(self, claim: Claim, got: Sequence[bytes | None] | BaseException) -> None:
        """Hand the owned chunks' bytes (or the failure) to every READ waiting on them."""
        for k, (i, chunk, fut) in enumerate(claim.owned):
            self._inflight.pop(chunk.digest, None)
            if fut.done():
                continue
            if isinstance(got, BaseException):
                fut.set_exception(got)
                fut.exception()  # retrieved: joiners re-raise it themselves
                continue
            data = got[k]
            assert data is not None  # noqa: S101 - callers settle only whole results
            claim.data[i] = data
            self._remember(chunk.digest, data)
            fut.set_result(data)

    def read_local(self, chunks: Sequence[Chunk]) -> list[bytes | None]:
        """Read and verify chunks from the local store (blocking; any thread).

        A chunk missing or damaged locally but fetchable remotely comes back as
        None (with write-through, the fetched bytes then replace the damaged file).
        """
        out: list[bytes | None] = []
        for chunk in chunks:
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
            "joined" (another READ was already fetching it), the farthest one used.

        Raises:
            StoreError: a chunk is missing, corrupt or could not be fetched.
        """
        return await self.fetch_claimed(blob, self.claim(chunks))

    async def fetch_claimed(
        self, blob: Blob, claim: Claim, got: list[bytes | None] | None = None
    ) -> tuple[list[bytes], str]:
        """Fetch what `claim` owns (`got`: what read_local already returned), settle, gather."""
        source = "cache"
        if claim.owned:
            wanted = [c for _, c, _ in claim.owned]
            try:
                if got is None:
                    loop = asyncio.get_running_loop()
                    got = await loop.run_in_executor(self._executor, self.read_local, wanted)
                source = "local"
                if any(d is None for d in got):
                    missing = [c for c, d in zip(wanted, got, strict=True) if d is None]
                    fetched = iter(await self._fetch_remote(blob, missing))
                    got = [next(fetched) if d is None else d for d in got]
                    source = "remote"
            except BaseException as exc:
                self.settle(claim, exc)
                raise
            self.settle(claim, got)
        return await self._gather(claim, source)

    async def _gather(self, claim: Claim, source: str) -> tuple[list[bytes], str]:
        """Wait for the chunks other READs are fetching; all of the claim's bytes, in order."""
        for i, fut in claim.joined:
            claim.data[i] = await asyncio.shield(fut)
            if source == "cache":
                source = "joined"
        return [d for d in claim.data if d is not None], source

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
