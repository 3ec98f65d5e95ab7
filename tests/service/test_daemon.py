# SPDX-License-Identifier: Apache-2.0
"""daemon.serve as a whole: READY only once serving, STOPPING and a drained exit."""
from __future__ import annotations

import asyncio
import socket

from structlog.testing import capture_logs

from fakekernel import FakeKernel
from ondemand_d import daemon
from ondemand_d.config import load
from ondemand_d.device import Device
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Image


async def test_serve_notifies_and_drains(tmp_path, monkeypatch):
    notify = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(notify))
    srv.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    store = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_bytes(b"z" * 10000)
    blob = store.ingest_file(tmp_path / "f")
    store.put_image(Image("k", blob.blob_id))
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.start()
    cfg = load(None, {}, {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "c"),
                          "native": "python", "control_socket": str(tmp_path / "ctl")})
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(cfg, Device(kernel.device_fd, cfg.device), stop))
        obj = await kernel.open(b"k")
        assert obj.copen_result == 10000
        stop.set()
        service = await asyncio.wait_for(task, 10)
    assert service.counters.opens == 1
    messages = []
    while True:
        try:
            messages.append(srv.recv(4096))
        except BlockingIOError:
            break
    assert messages[0].startswith(b"READY=1")
    assert b"STOPPING=1" in messages
    assert [e["event"] for e in logs if e["event"] in ("ready", "stopping", "stopped")] == [
        "ready", "stopping", "stopped"]
    assert not kernel.fd_open(obj)  # drained: the object's fd was closed at exit
    kernel.stop()
    srv.close()


async def test_adopted_device_without_restore_keeps_serving(tmp_path, monkeypatch):
    """Kernel < 6.8: `restore` is refused; the successor says so once and serves new OPENs."""
    from fakekernel import RecordingBackend
    from ondemand_d import _native

    store = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_bytes(b"z" * 10000)
    store.put_image(Image("k", store.ingest_file(tmp_path / "f").blob_id))
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.restore_supported = False
    kernel.start()
    monkeypatch.setattr(daemon, "open_device", lambda cfg: (kernel.device(), True))
    real = _native.load_backend("python")
    monkeypatch.setattr(_native, "load_backend", lambda _n: RecordingBackend(real, kernel))
    cfg = load(None, {}, {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "c"),
                          "control_socket": ""})
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(cfg, None, stop))
        obj = await kernel.open(b"k")
        assert await kernel.read(obj, 0, 4096)
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [e["event"] for e in logs].count("restore_unsupported") == 1
    (ready,) = [e for e in logs if e["event"] == "ready"]
    assert (ready["adopted"], ready["restore"], ready["restored"]) == (True, False, False)
    kernel.stop()
