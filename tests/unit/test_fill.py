# SPDX-License-Identifier: Apache-2.0
"""fill.py without a kernel: the plan of a READ, and background writes over holes only.

The cache file here is a real sparse file, as the fake kernel's anon fds are:
SEEK_DATA/SEEK_HOLE say what it holds, and a recording backend counts every
byte the engine writes into it.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ondemand_d import cachedir, protocol
from ondemand_d._native import PythonBackend
from ondemand_d.fill import PAD_LIMIT, FillEngine, Progress, in_holes, plan
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import PAGE, Blob, Chunk

CHUNK = 64 << 10


def _blob(tmp: Path, size: int) -> tuple[LocalStore, Blob, bytes]:
    data = random.Random(5).randbytes(size)
    (tmp / "src").write_bytes(data)
    store = LocalStore(tmp / "store")
    return store, store.ingest_file(tmp / "src", CHUNK), data


class Counting:
    """The Python backend, counting what it writes."""

    name = "counting"

    def __init__(self) -> None:
        self.real = PythonBackend()
        self.written = 0
        self.writes: list[tuple[int, int]] = []

    def complete(self, fd: int, msg_id: int) -> None:
        pass

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        self.fill_parts(fd, [buf], off, msg_id, complete=complete)

    def fill_parts(self, fd: int, parts: Any, off: int, msg_id: int, *, complete: bool,
                   size: int = 0) -> int:
        n = max(size, sum(len(memoryview(p)) for p in parts))
        self.written += -(-n // PAGE) * PAGE
        self.writes.append((off, n))
        return self.real.fill_parts(fd, parts, off, msg_id, complete=False, size=size)


def test_plan_widens_to_chunks_and_pads_past_the_end(tmp_path):
    _, blob, _ = _blob(tmp_path, 3 * CHUNK + 100)
    span = plan(blob, CHUNK + 10, 5)
    assert (span.start, span.data_end, span.pad_to) == (CHUNK, 2 * CHUNK, 2 * CHUNK)
    tail = plan(blob, 3 * CHUNK + 200, 100)  # unaligned, inside the last page, past the end
    assert tail.chunks == blob.chunks[-1:] and tail.pad_to == 3 * CHUNK + PAGE
    huge = plan(blob, 0, 1 << 30)
    assert huge.chunks == blob.chunks
    assert huge.pad_to == 3 * CHUNK + PAGE + PAD_LIMIT  # never the READ's whole length
    beyond = plan(blob, 8 * CHUNK, PAGE)
    assert beyond.chunks == () and beyond.pad_to == beyond.start + PAGE


def test_holes_of_a_sparse_file(tmp_path):
    path = tmp_path / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 16 * PAGE)
        os.pwrite(fd, b"x" * PAGE, 2 * PAGE)
        os.pwrite(fd, b"y" * 2 * PAGE, 8 * PAGE)
        assert cachedir.holes(fd, 0, 16 * PAGE) == [(0, 2 * PAGE), (3 * PAGE, 8 * PAGE),
                                                    (10 * PAGE, 16 * PAGE)]
        assert cachedir.holes(fd, 2 * PAGE, 3 * PAGE) == []
        assert cachedir.holes(fd, 15 * PAGE, 20 * PAGE) == [(15 * PAGE, 20 * PAGE)]  # past EOF
        assert cachedir.data_bytes(fd) == 3 * PAGE
    finally:
        os.close(fd)


async def _background(tmp: Path, blob: Blob, store: LocalStore, fd: int,
                      off: int, end: int) -> tuple[Counting, Progress]:
    backend = Counting()
    with ThreadPoolExecutor(2) as pool:
        engine = FillEngine(ChunkFetcher(store, pool), backend, pool)  # type: ignore[arg-type]
        engine.blobs[1] = blob  # the object id of the action below
        progress = Progress()
        action = protocol.StartBackground(1, fd, blob.blob_id, "prefill", off, end)
        await engine.background(action, progress)
    return backend, progress


async def test_background_writes_only_the_holes(tmp_path):
    """Chunks 0, 3 and 5 are cached already: a prefill writes the other five, nothing else."""
    store, blob, data = _blob(tmp_path, 8 * CHUNK - 1000)
    path = tmp_path / "cache"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 8 * CHUNK)
        for i in (0, 3, 5):
            os.pwrite(fd, data[i * CHUNK : (i + 1) * CHUNK], i * CHUNK)
        backend, progress = await _background(tmp_path, blob, store, fd, 0, blob.size)
        covered = sorted(i for off, n in backend.writes for i in range(off // CHUNK, -(-(off + n) // CHUNK)))
        assert covered == [1, 2, 4, 6, 7]
        assert backend.written == progress.written == 5 * CHUNK
        assert path.read_bytes()[: blob.size] == data
        # Everything is cached now: the same prefill again writes nothing.
        again, progress = await _background(tmp_path, blob, store, fd, 0, blob.size)
        assert again.written == 0 and again.writes == [] and progress.chunks == 0
    finally:
        os.close(fd)


def test_in_holes_counts_a_chunks_last_partial_page():
    """A chunk ending 904 bytes into a page is cached only when that whole page is."""
    a, b = Chunk(0, 2 * PAGE, "0" * 64), Chunk(2 * PAGE, PAGE + 904, "1" * 64)
    assert in_holes((a, b), [(3 * PAGE, 4 * PAGE)]) == (b,)  # the hole is in b's last page
    assert in_holes((a, b), [(4 * PAGE, 9 * PAGE)]) == ()
    assert in_holes((a, b), [(PAGE, PAGE + 1)]) == (a,)


async def test_attack_prefill_of_an_unwalkable_bootstrap_stops_at_the_cap(tmp_path):
    """A bootstrap the metadata walk gives up on is not prefilled whole past the cap: above
    it nothing is written (the kernel READs what it needs), at or under it the whole blob."""
    store, blob, data = _blob(tmp_path, 8 * CHUNK - 1000)
    for cap, expect in ((4 * CHUNK, 0), (8 * CHUNK, -(-blob.size // PAGE) * PAGE)):
        path = tmp_path / f"cache-{cap}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, 8 * CHUNK)
            backend = Counting()
            with ThreadPoolExecutor(2) as pool:
                engine = FillEngine(ChunkFetcher(store, pool),
                                    backend, pool,  # type: ignore[arg-type]
                                    whole_prefill_cap=cap)
                engine.blobs[1] = blob  # the object id of the action below
                progress = Progress()
                await engine.background(
                    protocol.StartBackground(1, fd, blob.blob_id, "prefill", 0, blob.size),
                    progress)
            assert backend.written == progress.written == expect
            assert cachedir.data_bytes(fd) == expect
            assert progress.note.startswith("not walked as EROFS")
            if not expect:
                assert f"above the cap of {cap}, nothing prefilled" in progress.note
        finally:
            os.close(fd)
