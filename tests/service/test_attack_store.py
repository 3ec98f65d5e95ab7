# SPDX-License-Identifier: Apache-2.0
"""A FIFO (or symlink, or directory) planted in the store as a chunk file, on the daemon's
READ path (daemon.serve on the fake kernel, a real store).

Opening a FIFO for reading waits for a writer: the READ never completed, an I/O thread
stayed stuck in open(2) and the daemon could not stop.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import select
from pathlib import Path

import pytest

from ondemand_d import log
from ondemand_d.fanotify import syscalls
from ondemand_d.store.fsck import fsck
from ondemand_d.store.local import LocalStore

from .test_control import Running


@pytest.fixture(autouse=True)
def _observed_logs():
    log.configure("json", "warning", cache=False, observe=True)


def _plant(path: Path, kind: str, tmp: Path) -> None:
    path.chmod(0o644)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp / "elsewhere").write_bytes(b"x" * 4096)
        path.symlink_to(tmp / "elsewhere")
    else:
        path.mkdir()


def _release(path: Path) -> None:
    """Let a reader stuck in open(2) on the FIFO go (only before the fix is there one)."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.damages_store
@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
async def test_chunk_file_that_is_not_a_regular_file_fails_the_read(tmp_path, kind):
    """The READ of a chunk whose file is a FIFO, a symlink or a directory fails at once (the
    fake kernel sees the range absent: EIO to the reader), the log says why, a READ of a
    sound chunk still works and the daemon stops cleanly; fsck names the file."""
    events: list[dict] = []
    log.observe(lambda _m, e: events.append(dict(e)))
    chunk = 1 << 20
    async with Running(tmp_path) as d:
        blob_id = d.add_image("img", os.urandom(2 * chunk))
        bad = d.store.get_blob(blob_id).chunks[0]
        path = d.store.chunk_path(bad.digest)
        _plant(path, kind, tmp_path)
        try:
            obj = await d.kernel.open(b"img-data", b"erofs,dom")
            assert not await d.kernel.read(obj, 0, 4096)  # EIO, not a hang
            assert await d.kernel.read(obj, chunk, 4096)  # the other chunk is fine
        finally:
            _release(path)
    failed = [e for e in events if e.get("op") == "READ" and e.get("outcome") != "ok"]
    why = str(failed[0]) if failed else ""
    assert "not a regular file" in why or "cannot be opened (Too many levels" in why, why
    report = fsck(LocalStore(tmp_path / "store"))
    assert [(p.kind, p.path) for p in report.problems
            if p.kind == "chunk-damaged"] == [("chunk-damaged", str(path))]


class HeldFile:
    """Reads of one real file block in the kernel until released: a FAN_PRE_ACCESS mark
    whose events nobody answers (what a read on a hung NFS or FUSE filesystem does).
    Closing the group answers them (allowed), and the blocked reads return."""

    def __init__(self, path: Path) -> None:
        self.group = syscalls.fanotify_init()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            syscalls.mark_fd(self.group, fd)
        finally:
            os.close(fd)

    async def blocked(self) -> None:
        """Once a read of the file is blocked (its event waits in the group's queue)."""
        ready, _, _ = await asyncio.to_thread(select.select, [self.group], [], [], 30)
        assert ready, "no read of the held file began"

    def release(self) -> None:
        if self.group >= 0:
            os.close(self.group)
            self.group = -1


async def _logged(events: list[dict], name: str) -> dict:
    for _ in range(3000):
        found = [e for e in events if e.get("event") == name]
        if found:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never logged")


@pytest.mark.usefixtures("fanotify_works")  # the hung read is a pre-content mark
async def test_chunk_read_on_a_hung_filesystem_fails_at_the_deadline(tmp_path):
    """A chunk file whose read blocks in the kernel (a hung NFS or FUSE store): its READ fails
    at local_read_timeout (absent to the fake kernel: EIO to the reader) and the log names
    the file; a READ of another chunk is served meanwhile; once the read returns, the late
    thread writes and completes nothing (the range stays a hole, one completion); the
    daemon stops cleanly."""
    events: list[dict] = []
    log.observe(lambda _m, e: events.append(dict(e)))
    chunk = 1 << 20
    async with Running(tmp_path, local_read_timeout=0.5) as d:
        blob_id = d.add_image("img", os.urandom(2 * chunk))
        held_chunk = d.store.get_blob(blob_id).chunks[0]
        held = HeldFile(d.store.chunk_path(held_chunk.digest))
        try:
            obj = await d.kernel.open(b"img-data", b"erofs,dom")
            stuck = d.kernel.send_read(obj, 0, 4096)
            await held.blocked()
            assert await d.kernel.read(obj, chunk, 4096)  # another chunk, while it hangs
            await asyncio.wait_for(stuck.done.wait(), 30)  # the deadline answers it
            assert (stuck.present, stuck.completions) == (False, 1)
            line = await _logged(events, "local_read_stuck")
            assert line["file"] == str(d.store.chunk_path(held_chunk.digest))
            assert "hung filesystem" in line["error"]
            again = d.kernel.send_read(obj, 0, 4096)  # no second thread on the stuck file
            await asyncio.wait_for(again.done.wait(), 30)
            assert (again.present, again.completions) == (False, 1)
            assert (await d.get("/status"))["stuck_local_reads"] == 1
            assert "ondemand_stuck_local_reads 1" in await asyncio.to_thread(
                d.client.text, "/metrics")
        finally:
            held.release()
        await _logged(events, "local_read_returned")
        assert (stuck.completions, again.completions) == (1, 1)
        assert not d.kernel.range_present(obj, 0, 4096)  # the late thread wrote nothing
        assert d.kernel.bad_completions == []
        assert await d.kernel.read(obj, 0, 4096)  # the file reads again once it returns
        assert (await d.get("/status"))["stuck_local_reads"] == 0
    failed = [str(e) for e in events if e.get("op") == "READ" and e.get("outcome") != "ok"]
    assert len(failed) == 2, failed
    assert "did not return within 0.5 s" in failed[0], failed
    assert "is still stuck" in failed[1], failed


@pytest.mark.usefixtures("fanotify_works")  # the hung read is a pre-content mark
async def test_reads_queued_behind_a_hung_chunk_read_are_served(tmp_path):
    """A burst of READs shares I/O jobs (two here): the READ queued behind the hung one in
    its job moves to another job at the deadline and is served while the thread is stuck."""
    chunk = 1 << 20
    async with Running(tmp_path, local_read_timeout=0.5, io_threads=2) as d:
        blob_id = d.add_image("img", os.urandom(4 * chunk))
        held = HeldFile(d.store.chunk_path(d.store.get_blob(blob_id).chunks[0].digest))
        try:
            obj = await d.kernel.open(b"img-data", b"erofs,dom")
            burst = [d.kernel.send_read(obj, i * chunk, 4096) for i in range(4)]
            await held.blocked()
            for read in burst:
                await asyncio.wait_for(read.done.wait(), 30)
            assert [(r.present, r.completions) for r in burst] == [(False, 1)] + [(True, 1)] * 3
        finally:
            held.release()


@pytest.mark.usefixtures("fanotify_works")  # the hung read is a pre-content mark
async def test_serve_stops_while_a_chunk_read_is_still_stuck(tmp_path):
    """A stop while an I/O thread is stuck in a chunk read (past the deadline): serve ends
    without waiting for it, the log says how many threads are stuck; the thread ends once
    its read returns."""
    events: list[dict] = []
    log.observe(lambda _m, e: events.append(dict(e)))
    d = Running(tmp_path, local_read_timeout=0.5)
    blob_id = d.add_image("img", os.urandom(1 << 20))
    held = HeldFile(d.store.chunk_path(d.store.get_blob(blob_id).chunks[0].digest))
    try:
        async with d:
            obj = await d.kernel.open(b"img-data", b"erofs,dom")
            stuck = d.kernel.send_read(obj, 0, 4096)
            await held.blocked()
            await asyncio.wait_for(stuck.done.wait(), 30)
            assert (stuck.present, stuck.completions) == (False, 1)
        assert d.task.done() and d.task.exception() is None  # stopped while still stuck
        assert [e["threads"] for e in events if e.get("event") == "stuck_local_reads"] == [1]
    finally:
        held.release()
    assert stuck.completions == 1
