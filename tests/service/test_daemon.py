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


def _notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    return srv


def _received(srv):
    out = []
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(srv, 4096, 4)
        except BlockingIOError:
            return out
        for fd in fds:
            import os
            os.close(fd)
        out.append((msg, len(fds)))


async def _serve_briefly(tmp_path, monkeypatch, *, restore: bool, adopted: bool):
    store = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_bytes(b"z" * 10000)
    store.put_image(Image("k", store.ingest_file(tmp_path / "f").blob_id))
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.restore_supported = restore
    kernel.start()
    monkeypatch.setattr(daemon, "open_device", lambda cfg: (kernel.device(), adopted))
    cfg = load(None, {}, {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "c"),
                          "control_socket": "", "native": "python"})
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(cfg, None, stop))
        obj = await kernel.open(b"k")
        assert obj.copen_result == 10000  # serving either way
        stop.set()
        await asyncio.wait_for(task, 10)
    kernel.stop()
    return logs


async def test_fd_store_holds_the_device_only_if_restore_works(tmp_path, monkeypatch):
    """Failover kernel: the bound device goes to the fd store (with FDPOLL=0), once."""
    srv = _notify_socket(tmp_path, monkeypatch)
    await _serve_briefly(tmp_path, monkeypatch, restore=True, adopted=False)
    stored = [(m, n) for m, n in _received(srv) if m.startswith(b"FDSTORE=1\nFDNAME=cachefiles")]
    assert stored == [(b"FDSTORE=1\nFDNAME=cachefiles\nFDPOLL=0", 1)]
    srv.close()


async def test_kernel_without_restore_keeps_the_device_out_of_the_fd_store(tmp_path, monkeypatch):
    """Before 6.8 a stored device would keep a dead instance's READs pending forever."""
    srv = _notify_socket(tmp_path, monkeypatch)
    logs = await _serve_briefly(tmp_path, monkeypatch, restore=False, adopted=False)
    messages = [m for m, _n in _received(srv)]
    assert not [m for m in messages if b"FDNAME=cachefiles" in m], messages
    (line,) = [e for e in logs if e["event"] == "restore_unsupported"]
    assert "fd store" not in line["consequence"] and "not used" in line["fd_store"]
    srv.close()


async def test_adopted_device_without_restore_leaves_the_fd_store(tmp_path, monkeypatch):
    """An inherited device on a kernel without `restore` is dropped from the store, once."""
    srv = _notify_socket(tmp_path, monkeypatch)
    logs = await _serve_briefly(tmp_path, monkeypatch, restore=False, adopted=True)
    messages = [m for m, _n in _received(srv)]
    assert messages.count(b"FDSTOREREMOVE=1\nFDNAME=cachefiles") == 1, messages
    assert not [m for m in messages if m.startswith(b"FDSTORE=1\nFDNAME=cachefiles")]
    assert [e["event"] for e in logs].count("restore_unsupported") == 1
    srv.close()


async def test_sighup_is_logged_not_fatal(tmp_path, monkeypatch):
    """`systemctl reload` sends SIGHUP: the daemon says settings apply at start and serves on."""
    import os
    import signal

    store = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_bytes(b"z" * 10000)
    store.put_image(Image("k", store.ingest_file(tmp_path / "f").blob_id))
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.start()
    cfg = load(None, {}, {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "c"),
                          "control_socket": "", "native": "python"})
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(cfg, kernel.device(), stop))
        await asyncio.sleep(0.2)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.2)
        obj = await kernel.open(b"k")  # still serving
        assert obj.copen_result == 10000
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [e["event"] for e in logs].count("reload_ignored") == 1
    kernel.stop()


async def test_wedge_fault_stops_the_loop_and_the_watchdog_ping(tmp_path, monkeypatch):
    """ONDEMAND_D_TEST_WEDGE: requests stay queued, and Liveness says the loop is stuck."""
    from ondemand_d.watchdog import Liveness

    store = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_bytes(b"z" * 10000)
    store.put_image(Image("k", store.ingest_file(tmp_path / "f").blob_id))
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.start()
    monkeypatch.setenv("ONDEMAND_D_TEST_WEDGE", "0.1")
    cfg = load(None, {}, {"store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "c"),
                          "control_socket": "", "native": "python"})
    stop = asyncio.Event()
    seen = {}
    real_start = daemon.Service.start

    def start(self):
        seen["service"] = self
        real_start(self)

    monkeypatch.setattr(daemon.Service, "start", start)
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(cfg, kernel.device(), stop))
        await asyncio.sleep(0.5)
        liveness = Liveness(seen["service"], 30.0)
        assert liveness.check() is True  # idle and waiting: alive
        opening = asyncio.ensure_future(kernel.open(b"k"))
        await asyncio.sleep(0.3)
        assert not opening.done()  # nobody takes the request
        assert liveness.check() is False  # queued, nothing in flight, no progress
        stop.set()
        await asyncio.wait_for(task, 10)
        opening.cancel()
    assert [e["event"] for e in logs].count("test_fault_wedged") == 1
    kernel.stop()


def test_hold_background_fault_writes_half_then_blocks(tmp_path, monkeypatch):
    """ONDEMAND_D_TEST_HOLD_BACKGROUND=PATH: the first background write writes the first half
    of its range (whole blocks) and blocks; a later one blocks before writing; READs
    (msg_id != 0) are never held by it, and nothing is held without the file."""
    import threading

    from ondemand_d import faults

    calls = []

    class Inner:
        name = "python"

        def fill_parts(self, fd, parts, off, msg_id, *, complete, size=0):
            data = b"".join(bytes(p) for p in parts)
            calls.append((msg_id, off, data))
            return len(data)

        def complete(self, fd, msg_id):
            calls.append(("complete", msg_id))

    flag = tmp_path / "hold-bg"
    monkeypatch.setenv("ONDEMAND_D_TEST_HOLD_BACKGROUND", str(flag))
    backend = faults.wrap_backend(Inner())
    assert backend.fill_parts(3, [b"a" * 4096], 0, 0, complete=False) == 4096  # no file yet
    flag.touch()
    body = [b"b" * 6000, b"c" * 6288]  # 12288 bytes: the first 4096 + 2048 are half, in blocks
    threads = [threading.Thread(target=backend.fill_parts, args=(3, parts, off, 0),
                                kwargs={"complete": False}, daemon=True)
               for parts, off in ((body, 4096), ([b"d" * 4096], 65536))]
    for t in threads:
        t.start()
        t.join(0.3)
        assert t.is_alive()
    assert calls == [(0, 0, b"a" * 4096), (0, 4096, b"b" * 4096)]  # half, whole blocks; no d
    assert backend.fill_parts(3, [b"z"], 8192, 9, complete=True) == 1  # a READ is not held
    assert calls[-2:] == [(9, 8192, b"z"), ("complete", 9)]


def test_hold_fault_completes_nothing_while_its_file_exists(tmp_path, monkeypatch):
    """ONDEMAND_D_TEST_HOLD_READS=PATH: data written, completion held only while PATH exists."""
    import threading

    from ondemand_d import faults

    calls = []

    class Inner:
        name = "python"

        def fill(self, fd, buf, off, msg_id, *, complete):
            calls.append(("fill", msg_id, complete))

        def complete(self, fd, msg_id):
            calls.append(("complete", msg_id))

    flag = tmp_path / "hold"
    monkeypatch.setenv("ONDEMAND_D_TEST_HOLD_READS", str(flag))
    backend = faults.wrap_backend(Inner())
    backend.fill(3, b"x", 0, 7, complete=True)
    assert calls == [("fill", 7, False), ("complete", 7)]
    flag.touch()
    held = threading.Thread(target=backend.fill, args=(3, b"x", 0, 8), kwargs={"complete": True},
                            daemon=True)
    held.start()
    held.join(0.3)
    assert held.is_alive() and calls[-1] == ("fill", 8, False)  # written, never completed
    monkeypatch.delenv("ONDEMAND_D_TEST_HOLD_READS")
    assert faults.wrap_backend(Inner()).__class__ is Inner  # off unless asked for
    # The real backends' pooled paths are held the same way (complete=False, then hold).
    from ondemand_d import _native

    real = faults._Holding(_native.load_backend("python"), str(tmp_path / "absent"), None)
    assert real.pool is _native.POOL and real.name == "python"

