# SPDX-License-Identifier: Apache-2.0
"""`serve --images DIR` against files that change under it (daemon.serve on the fake kernel).

Before: a file rewritten (or replaced) after its OPEN was read at its new content for the
READs that followed, so one mount saw two versions; a FIFO swapped in hung the READ in
open(2); and a 1 TiB sparse file cost a chunk table of a million entries (24 s, 319 MB).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tracemalloc
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fakekernel import FakeKernel, RecordingBackend
from ondemand_d import _native, daemon
from ondemand_d.config import load
from ondemand_d.imagesdir import ImagesDir

from .test_attack_store import HeldFile

MIB = 1 << 20


class Served:
    """daemon.serve --images over `tmp/images` on the fake kernel."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, **flags: object) -> None:
        self.images = tmp / "images"
        self.images.mkdir()
        (tmp / "cache").mkdir()
        self.kernel = FakeKernel(tmp / "cache")
        real = _native.load_backend("python")
        monkeypatch.setattr(_native, "load_backend",
                            lambda _n: RecordingBackend(real, self.kernel))
        self.cfg = load(None, {}, {"images_dir": str(self.images), "cache_dir": str(tmp / "c"),
                                   "control_socket": "", "readahead": 0,
                                   "store": str(tmp / "never-created"), **flags})
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Served:
        self.kernel.start()
        self.task = asyncio.create_task(daemon.serve(self.cfg, self.kernel.device(), self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)  # stops cleanly: no I/O thread is stuck
        self.kernel.stop()


def _rewrite_in_place(path: Path, data: bytes) -> None:
    with path.open("r+b") as f:
        f.write(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock too


def _replace(path: Path, data: bytes) -> None:
    """A new file renamed over the old one, with the old one's mtime (as `cp -p` leaves it)."""
    st = path.stat()
    new = path.with_name(".new")
    new.write_bytes(data)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    new.rename(path)


@pytest.mark.parametrize("change", [_rewrite_in_place, _replace])
async def test_a_file_changed_after_open_never_mixes_versions(tmp_path, monkeypatch, change):
    """READs after the change fail (EIO, logged as changed), never return the new bytes into
    the object opened on the old ones; a new OPEN serves the new version whole."""
    old, new = os.urandom(2 * MIB), os.urandom(2 * MIB)
    with capture_logs() as logs:
        async with Served(tmp_path, monkeypatch) as s:
            path = s.images / "img"
            path.write_bytes(old)
            obj = await s.kernel.open(b"img")
            assert await s.kernel.read(obj, 0, 4096)
            change(path, new)
            assert not await s.kernel.read(obj, MIB, 4096)  # EIO: not the new version
            again = await s.kernel.open(b"img", b"erofs,other")
            assert await s.kernel.read(again, 0, 2 * MIB)
    assert s.kernel.cache_bytes(obj)[:4096] == old[:4096]
    assert s.kernel.cache_bytes(obj)[MIB:MIB + 4096] != new[MIB:MIB + 4096]
    assert s.kernel.cache_bytes(again) == new
    failed = [e for e in logs if e.get("op") == "READ" and e.get("outcome") == "eio"]
    assert len(failed) == 1 and "changed since it was opened" in failed[0]["error"]


async def test_a_fifo_swapped_in_after_open_fails_the_read_at_once(tmp_path, monkeypatch):
    """The image file replaced by a FIFO after OPEN: the READ gets EIO, no thread stays in
    open(2), the daemon stops."""
    async with Served(tmp_path, monkeypatch) as s:
        path = s.images / "img"
        path.write_bytes(os.urandom(MIB))
        obj = await s.kernel.open(b"img")
        path.unlink()
        os.mkfifo(path)
        try:
            assert not await s.kernel.read(obj, 0, 4096)
        finally:
            with contextlib.suppress(OSError):  # release a reader stuck before the fix
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_1_tib_sparse_file_costs_no_chunk_table(tmp_path, monkeypatch):
    """OPEN, READ at the end and `status`'s listing of a 1 TiB sparse file allocate well under
    a megabyte (a table of its million chunks took 319 MB); bigger than images_max_size is
    refused at OPEN."""
    images = tmp_path / "plain"
    images.mkdir()
    with (images / "huge").open("wb") as f:
        f.truncate(1 << 40)
    store = ImagesDir(images)
    tracemalloc.start()
    try:
        blob = store.resolve(b"huge")
        listed = list(store.images())
        tail = blob.chunks_for((1 << 40) - 4096, 4096)
        data = store.read_chunk(tail[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert blob.size == 1 << 40 and len(blob.chunks) == 1 << 20
    assert [i.name for i in listed] == ["huge"] and data == bytes(MIB)
    assert peak < (4 << 20)  # the chunk read itself is 1 MiB
    async with Served(tmp_path, monkeypatch, images_max_size="1G") as s:
        with (s.images / "huge").open("wb") as f:
            f.truncate((1 << 30) + 4096)
        (s.images / "fits").write_bytes(b"x" * 4096)
        refused = await s.kernel.open(b"huge")
        fits = await s.kernel.open(b"fits")
    assert refused.copen_result == -errno.EIO
    assert fits.copen_result == 4096


@pytest.mark.usefixtures("fanotify_works")  # the hung read is a pre-content mark
async def test_an_image_file_on_a_hung_filesystem_fails_the_read_at_the_deadline(
        tmp_path, monkeypatch):
    """Reads of the image file block in the kernel (an unanswered pre-content event, as on
    a hung NFS or FUSE filesystem): the READ fails at local_read_timeout, the log names the
    file; once the read returns, the late thread wrote and completed nothing; the daemon
    stops cleanly."""
    with capture_logs() as logs:
        async with Served(tmp_path, monkeypatch, local_read_timeout=0.5) as s:
            path = s.images / "img"
            path.write_bytes(os.urandom(MIB))
            obj = await s.kernel.open(b"img")
            held = HeldFile(path)
            try:
                read = s.kernel.send_read(obj, 0, 4096)
                await held.blocked()
                await asyncio.wait_for(read.done.wait(), 30)
                assert (read.present, read.completions) == (False, 1)
                stuck = [e for e in logs if e["event"] == "local_read_stuck"]
                assert stuck and stuck[0]["file"] == str(path), logs
            finally:
                held.release()
            for _ in range(3000):
                if any(e["event"] == "local_read_returned" for e in logs):
                    break
                await asyncio.sleep(0.01)
            assert read.completions == 1
            assert not s.kernel.range_present(obj, 0, 4096)
            assert s.kernel.bad_completions == []
