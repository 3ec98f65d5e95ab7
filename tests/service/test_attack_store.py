# SPDX-License-Identifier: Apache-2.0
"""A FIFO (or symlink, or directory) planted in the store as a chunk file, on the daemon's
READ path (daemon.serve on the fake kernel, a real store).

Opening a FIFO for reading waits for a writer: the READ never completed, an I/O thread
stayed stuck in open(2) and the daemon could not stop.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from ondemand_d import log
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
