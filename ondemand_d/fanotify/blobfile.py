# SPDX-License-Identifier: Apache-2.0
"""A blob's file in a domain: its fill fd, which chunks are filled, the events waiting on it."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ondemand_d.fanotify import uapi
from ondemand_d.store.model import Blob, Chunk

IOV_MAX = 512  # buffers per pwritev (the kernel takes 1024)


@dataclass(eq=False)
class BlobFile:
    """One blob's file in one domain: its fill fd (raises no events) and what is filled."""

    domain: str
    blob: Blob
    path: Path
    fd: int
    ino: tuple[int, int]
    filled: bytearray  # one byte per chunk: 1 once its bytes are in the file
    filling: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    pending: set[Pending] = field(default_factory=set)
    fills: int = 0  # chunks written since start (tests: "filled once")
    starts: list[int] = field(default_factory=list)  # chunk offsets, to find a range's first

    def __post_init__(self) -> None:
        self.starts = [c.offset for c in self.blob.chunks]

    def missing(self, chunks: Iterable[int]) -> list[int]:
        return [i for i in chunks if not self.filled[i]]

    @property
    def filled_bytes(self) -> int:
        return sum(c.length for i, c in enumerate(self.blob.chunks) if self.filled[i])


@dataclass(eq=False)
class Pending:
    """An event read and not yet answered."""

    seq: int
    event: uapi.Event
    file: BlobFile | None
    start: float
    chunks: tuple[int, ...] = ()
    answered: bool = False


def filled_chunks(fd: int, blob: Blob) -> bytearray:
    """Which chunks of the file are fully written: no hole anywhere in their range.

    A chunk is written whole with one write, and a killed write stops at a page, so
    a chunk with data on every page has all of its bytes (lseek raises no events).
    """
    out = bytearray(len(blob.chunks))
    for i, chunk in enumerate(blob.chunks):
        try:
            hole = os.lseek(fd, chunk.offset, os.SEEK_HOLE)
        except OSError:  # ENXIO: at or past the end
            continue
        out[i] = 1 if hole >= min(chunk.end, blob.size) > chunk.offset else 0
    return out


def write_runs(fd: int, chunks: list[Chunk], parts: list[bytes]) -> int:
    """Write chunks' verified bytes, one pwritev per contiguous run (I/O thread)."""
    written = 0
    i = 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and chunks[j].offset == chunks[j - 1].end and j - i < IOV_MAX:
            j += 1
        pos = chunks[i].offset
        run = parts[i:j]
        want = sum(len(p) for p in run)
        done = os.pwritev(fd, run, pos)
        while done < want:  # short write: the rest, byte-exact
            rest = b"".join(run)[done:]
            done += os.pwrite(fd, rest, pos + done)
        written += want
        i = j
    return written
