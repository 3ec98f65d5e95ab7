# SPDX-License-Identifier: Apache-2.0
"""The control socket of a running daemon (daemon.serve on the fake kernel, real cache files)."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
from pathlib import Path

import pytest

from fakekernel import FakeKernel, RecordingBackend
from ondemand_d import _native, cli, daemon, log
from ondemand_d.config import load
from ondemand_d.control.client import ControlClient, ControlUnavailable
from ondemand_d.errors import FetchError
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk, Image, RemoteRange

CHUNK = 1 << 20


class Running:
    """daemon.serve on a fake kernel with the control socket in tmp_path."""

    def __init__(self, tmp: Path, **flags: object) -> None:
        self.tmp = tmp
        self.store = LocalStore(tmp / "store")
        self.kernel = FakeKernel(tmp / "cache", layout=True)
        self.socket = tmp / "ctl.sock"
        self.cfg = load(None, {}, {"store": str(tmp / "store"), "cache_dir": str(tmp / "cache"),
                                   "native": "python", "control_socket": str(self.socket),
                                   "readahead": 0, **flags})
        self.stop = asyncio.Event()
        self.client = ControlClient(self.socket, timeout=10)

    def add_image(self, name: str, data: bytes) -> str:
        """An image `name` (a small bootstrap) with `data` as its device `<name>-data`."""
        blobs = []
        for suffix, payload in (("boot", os.urandom(5000)), ("data", data)):
            src = self.tmp / f"{name}.{suffix}"
            src.write_bytes(payload)
            blobs.append(self.store.ingest_file(src).blob_id)
        self.store.put_image(Image(name, blobs[0], ((f"{name}-data", blobs[1]),)))
        return blobs[1]

    async def __aenter__(self) -> Running:
        (self.tmp / "cache").mkdir(exist_ok=True)
        self.kernel.start()
        # The fake kernel sees completions through the backend (an ioctl cannot be faked).
        real = _native.load_backend("python")
        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(_native, "load_backend",
                            lambda _name: RecordingBackend(real, self.kernel))
        self.task = asyncio.create_task(daemon.serve(self.cfg, self.kernel.device(), self.stop))
        for _ in range(200):
            if self.socket.exists():
                break
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        self.kernel.stop()
        self._patch.undo()

    async def get(self, url: str) -> dict:
        return await asyncio.to_thread(self.client.get, url)

    async def until_counted(self, op: str, n: int) -> dict:
        """/status once `n` requests of `op` were logged (a completion is logged after it)."""
        for _ in range(200):
            st = await self.get("/status")
            if sum(r["count"] for r in st["counters"]["requests"] if r["op"] == op) >= n:
                return st
            await asyncio.sleep(0.01)
        raise AssertionError(f"{op} not counted {n} times: {st['counters']}")


@pytest.fixture(autouse=True)
def _observed_logs():
    """Logging as `serve` configures it, so the control socket's counters see the lines."""
    log.configure("json", "warning", cache=False, observe=True)


async def test_socket_is_private_and_removed_at_exit(tmp_path):
    """The socket is mode 0600 while serving and gone after a clean stop."""
    async with Running(tmp_path) as d:
        mode = stat.S_IMODE(os.stat(d.socket).st_mode)
        assert stat.S_ISSOCK(os.stat(d.socket).st_mode)
        assert mode == 0o600
        routes = (await d.get("/"))["routes"]
        assert "GET /status" in routes and "GET /inflight" in routes
    assert not d.socket.exists()


async def test_status_counts_requests_and_cached_bytes(tmp_path):
    """status: kernel features, the image's blob with the bytes its cache file holds, counters.

    The log level is `warning`, which hides ok READ lines: they are counted all the same.
    """
    async with Running(tmp_path) as d:
        blob_id = d.add_image("img", os.urandom(3 * CHUNK + 5000))
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        assert obj.copen_result == 3 * CHUNK + 5000
        assert await d.kernel.read(obj, 0, 4096)  # fills the first whole chunk
        assert await d.kernel.read(obj, 2 * CHUNK, 4096)
        st = await d.get("/status")
    assert st["kernel"]["restore"] is True
    assert st["cache_dir"] == str(tmp_path / "cache")
    assert st["objects_open"] == 1
    (img,) = st["images"]
    boot, b = img["blobs"]
    assert (boot["role"], boot["open"], boot["cached_bytes"]) == ("bootstrap", False, 0)
    assert (b["blob"], b["open"], b["size"]) == (blob_id, True, 3 * CHUNK + 5000)
    # Two whole chunks are in the cache file, found by SEEK_DATA/SEEK_HOLE.
    assert b["cached_bytes"] == 2 * CHUNK
    reqs = {(r["op"], r["outcome"]): r["count"] for r in st["counters"]["requests"]}
    assert reqs == {("OPEN", "ok"): 1, ("READ", "ok"): 2}
    reads = {(r["source"], r["outcome"]): r for r in st["counters"]["reads"]}
    assert reads["local", "ok"]["count"] == 2
    assert reads["local", "ok"]["bytes"] == 2 * CHUNK


async def test_status_finds_cache_files_of_closed_objects(tmp_path):
    """After CLOSE the bytes cached come from the file in cache/I<volume>/@xx/D<key>."""
    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(2 * CHUNK))
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        assert await d.kernel.read(obj, CHUNK, 4096)
        d.kernel.close(obj)
        for _ in range(100):
            st = await d.get("/status")
            if st["objects_open"] == 0:
                break
            await asyncio.sleep(0.02)
    _, b = st["images"][0]["blobs"]
    assert (b["open"], b["cached_bytes"], b["cache_files"]) == (False, CHUNK, 1)


async def test_inflight_shows_a_waiting_read(tmp_path, monkeypatch):
    """A READ waiting on a remote fetch is listed with its range and what it waits for."""
    gate = asyncio.Event()

    class StalledRemote:
        async def fetch(self, blob, chunks):
            await gate.wait()
            raise FetchError("registry down", retryable=True)

        async def aclose(self):
            pass

    monkeypatch.setattr(daemon, "make_remote_source", lambda cfg: StalledRemote())
    async with Running(tmp_path, hung_read_after=0.01) as d:
        blob_id = d.add_image("img", os.urandom(CHUNK))
        blob = d.store.get_blob(blob_id)
        for c in blob.chunks:  # only in the "registry": the READ must fetch it
            d.store.chunk_path(c.digest).unlink()
        d.store.put_blob(Blob(blob.blob_id, blob.size, tuple(
            Chunk(c.offset, c.length, c.digest, RemoteRange("sha256:" + "0" * 64, 0, c.length))
            for c in blob.chunks)))
        obj = await d.kernel.open(b"img-data")
        outcome = d.kernel.send_read(obj, 8192, 4096)
        for _ in range(100):
            view = await d.get("/inflight")
            if view["reads"] and view["reads"][0]["hung"]:
                break
            await asyncio.sleep(0.02)
        gate.set()
        await asyncio.wait_for(outcome.done.wait(), 10)
        after = await d.get("/inflight")
    (row,) = view["reads"]
    assert (row["msg_id"], row["off"], row["len"], row["key"]) == (outcome.msg_id, 8192, 4096,
                                                                 "img-data")
    assert (row["blob"], row["waits_on"], row["hung"]) == (blob_id, "fetch", True)
    assert after["reads"] == []
    assert outcome.present is False  # the failed fetch was answered: the reader gets EIO


async def test_cli_status_and_errors(tmp_path, capsys):
    """`ondemand-d status` prints the view; without a daemon it says what to do, exit 1."""
    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(5000))
        rc = await asyncio.to_thread(cli.main, ["status", "--socket", str(d.socket)])
        out = capsys.readouterr().out
        assert rc == 0
        assert "kernel" in out and "restore yes" in out and "img" in out
        rc = await asyncio.to_thread(cli.main, ["status", "--json", "--socket", str(d.socket)])
        assert json.loads(capsys.readouterr().out)["images"][0]["name"] == "img"
    rc = cli.main(["status", "--socket", str(tmp_path / "ctl.sock")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "no ondemand-d is serving the control socket" in err


async def test_second_daemon_does_not_steal_the_socket(tmp_path):
    """A second daemon on the same path serves without a control socket and says why."""
    async with Running(tmp_path) as d:
        other = FakeKernel(tmp_path / "cache")
        other.start()
        events = []
        log.observe(lambda _m, e: events.append(dict(e)))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.serve(d.cfg, other.device(), stop))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 10)
        other.stop()
        assert (await d.get("/status"))["pid"] == os.getpid()  # the first still answers
    assert any(e["event"] == "control_unavailable" for e in events)
    with pytest.raises(ControlUnavailable):
        ControlClient(d.socket).get("/status")
