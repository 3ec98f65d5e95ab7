# SPDX-License-Identifier: Apache-2.0
"""serve --images DIR: plain files served by cookie key, unverified, on the fake kernel."""
from __future__ import annotations

import asyncio
import errno
import os

from structlog.testing import capture_logs

from fakekernel import FakeKernel, RecordingBackend
from ondemand_d import _native, daemon
from ondemand_d.config import load


async def test_images_dir_serves_files_by_name_and_refuses_the_rest(tmp_path, monkeypatch):
    """A file's bytes by its name; traversal, dot and directory keys get ENOENT; logged once."""
    images = tmp_path / "images"
    images.mkdir()
    data = os.urandom((1 << 20) + 12345)
    (images / "img").write_bytes(data)
    (images / "subdir").mkdir()
    (tmp_path / "outside").write_bytes(b"secret" * 1000)
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.start()
    real = _native.load_backend("python")
    monkeypatch.setattr(_native, "load_backend", lambda _n: RecordingBackend(real, kernel))
    cfg = load(None, {}, {"images_dir": str(images), "cache_dir": str(tmp_path / "c"),
                          "control_socket": "", "readahead": 0,
                          "store": str(tmp_path / "never-created")})
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(cfg, kernel.device(), stop))
        obj = await kernel.open(b"img")
        assert obj.copen_result == len(data)
        assert await kernel.read(obj, 1 << 20, 8192)  # the tail: past the end is zeros
        refused = [await kernel.open(k) for k in (b"../outside", b".hidden", b"subdir", b"nope")]
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [o.copen_result for o in refused] == [-errno.ENOENT] * 4
    cached = kernel.cache_bytes(obj)
    assert cached[1 << 20 : len(data)] == data[1 << 20 :]
    assert cached[len(data) : (1 << 20) + 16384] == bytes((1 << 20) + 16384 - len(data))
    assert [e["event"] for e in logs].count("images_unverified") == 1
    assert not (tmp_path / "never-created").exists()
    kernel.stop()
