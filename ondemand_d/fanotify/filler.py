# SPDX-License-Identifier: Apache-2.0
"""Filling a blob file's chunks for the fanotify front end.

Each missing chunk is filled once: the first caller claims it on the loop and fills it
(verified bytes from the `ChunkFetcher`, written through the file's fill fd), later ones
join that fill. After an event, `readahead` bytes that follow are filled the same way,
in pieces of about 1 MiB, so a sequential reader finds them there.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Executor
from typing import Any

import structlog

from ondemand_d.errors import StoreError
from ondemand_d.log import ms_since
from ondemand_d.fanotify.blobfile import BlobFile, write_runs
from ondemand_d.store.fetch import ChunkFetcher

log = structlog.get_logger()

READAHEAD_PIECE = 1 << 20


class ChunkFiller:
    """The fills of one front end's blob files.

    Args:
        fetcher: verified chunk bytes (shared with the fscache front end).
        executor: runs file writes.
        readahead: after an event, fill this many bytes that follow it.
        spawn: runs a readahead task (the front end tracks and cancels its tasks).
        make_room: called with a fill's size before it starts (on the loop); raises
            OSError(ENOSPC) when the cache limit leaves no room for it.
    """

    def __init__(self, fetcher: ChunkFetcher, executor: Executor, *, readahead: int,
                 spawn: Callable[[Coroutine[Any, Any, None]], None],
                 make_room: Callable[[int], None] | None = None) -> None:
        self.fetcher = fetcher
        self._make_room = make_room
        self.in_flight_bytes = 0  # claimed by fills under way, not yet on disk
        self._executor = executor
        self._readahead = readahead
        self._spawn = spawn
        self.bytes_filled = 0

    async def ensure(self, file: BlobFile, indices: Iterable[int]) -> tuple[int, str]:
        """Fill the chunks `indices` of `file` that are not filled; one fill per chunk.

        A joined fill that failed (a readahead of several chunks fails on any of them, or
        at the local read deadline) is tried once more by this caller for the chunks it
        still needs: a reader fails on its own chunks, not on a neighbour's.
        """
        wanted = list(indices)
        own, waits = self.claim(file, wanted)
        try:
            return await self.complete(file, own, waits)
        except (StoreError, OSError):
            if not waits or file.missing(i for i in wanted if i in own):
                raise  # its own fill failed: nothing another try would change
        own, waits = self.claim(file, wanted)
        return await self.complete(file, own, waits)

    @staticmethod
    def claim(file: BlobFile, indices: Iterable[int]
               ) -> tuple[list[int], list[asyncio.Future[None]]]:
        """Missing chunks this caller fills (claimed at once, on the loop) and fills it joins."""
        own: list[int] = []
        waits: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for i in file.missing(indices):
            fut = file.filling.get(i)
            if fut is None:
                file.filling[i] = loop.create_future()
                own.append(i)
            else:
                waits.append(fut)
        return own, waits

    async def complete(self, file: BlobFile, own: list[int],
                        waits: list[asyncio.Future[None]]) -> tuple[int, str]:
        source = "joined" if waits else "filled"
        written = 0
        if own:
            try:
                written, source = await self._fill(file, own)
            except BaseException as exc:
                for i in own:
                    fut = file.filling.pop(i)
                    fut.set_exception(exc if isinstance(exc, Exception) else
                                      StoreError("fill cancelled"))
                    fut.exception()  # retrieved: joiners raise it themselves
                raise
            for i in own:
                file.filled[i] = 1
                file.filling.pop(i).set_result(None)
        for fut in waits:
            await asyncio.shield(fut)
        return written, source

    async def _fill(self, file: BlobFile, own: list[int]) -> tuple[int, str]:
        chunks = [file.blob.chunks[i] for i in own]
        need = sum(c.length for c in chunks)
        if self._make_room is not None:
            self._make_room(need)
        self.in_flight_bytes += need
        try:
            parts, source = await self.fetcher.get(file.blob, chunks)
            loop = asyncio.get_running_loop()
            written = await loop.run_in_executor(self._executor, write_runs, file.fd, chunks,
                                                 parts)
        finally:
            self.in_flight_bytes -= need
        file.fills += len(chunks)
        self.bytes_filled += written
        return written, source

    def start_readahead(self, file: BlobFile, after: tuple[int, ...]) -> None:
        if not self._readahead or not after:
            return
        last = file.blob.chunks[after[-1]]
        ahead = file.blob.chunks_for(last.end, self._readahead)
        first = after[-1] + 1
        wanted = [i for i in range(first, first + len(ahead))
                  if not file.filled[i] and i not in file.filling]
        # About 1 MiB per task: they run on the I/O pool side by side, and a reader that
        # catches up waits for its own piece only.
        # Claimed now, so the next event does not start the same piece again.
        group: list[int] = []
        size = 0
        for i in wanted:
            group.append(i)
            size += file.blob.chunks[i].length
            if size >= READAHEAD_PIECE or i == wanted[-1]:
                own, _ = self.claim(file, group)
                self._spawn(self._read_ahead(file, own))
                group, size = [], 0

    async def _read_ahead(self, file: BlobFile, wanted: list[int]) -> None:
        start = time.perf_counter()
        try:
            written, _ = await self.complete(file, wanted, [])
        except (StoreError, OSError) as exc:  # optional: a READ of it will say more
            log.warning("read_ahead", frontend="fanotify", blob=file.blob.blob_id,
                        off=file.blob.chunks[wanted[0]].offset, outcome="error", error=str(exc))
            return
        log.info("read_ahead", frontend="fanotify", blob=file.blob.blob_id,
                 off=file.blob.chunks[wanted[0]].offset,
                 len=file.blob.chunks[wanted[-1]].end - file.blob.chunks[wanted[0]].offset,
                 bytes=written, outcome="ok", duration_ms=ms_since(start))

    async def fill_all(self, files: Iterable[BlobFile]) -> None:
        for file in files:
            await self.ensure(file, range(len(file.blob.chunks)))

