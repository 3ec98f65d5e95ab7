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
        st = await d.until_counted("READ", 2)
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
        d.store.blob_path(blob_id).unlink()  # records are never rewritten: make it anew
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


async def test_metrics_pass_promtool(tmp_path):
    """/metrics after OPENs, READs (one failing) and a CLOSE: promtool accepts it, values add up."""
    import shutil
    import subprocess

    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(2 * CHUNK))
        obj = await d.kernel.open(b"img-data", b'erofs,dom"with\\quote')
        assert await d.kernel.read(obj, 0, 4096)
        assert await d.kernel.read(obj, CHUNK, 4096)
        bad = await d.kernel.open(b"nosuchkey")
        assert bad.copen_result < 0
        await d.until_counted("READ", 2)
        text = await asyncio.to_thread(d.client.text, "/metrics")
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: scripts/install-deps"
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode() + text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples['ondemand_requests_total{frontend="fscache",op="READ",outcome="ok"}'] == "2"
    assert samples['ondemand_requests_total{frontend="fscache",op="OPEN",outcome="ok"}'] == "1"
    assert samples['ondemand_requests_total{frontend="fscache",op="OPEN",outcome="unknown"}'] == "1"
    assert samples['ondemand_read_bytes_total{frontend="fscache",source="local"}'] == str(2 * CHUNK)
    assert samples['ondemand_read_duration_seconds_count'] == "2"
    assert samples['ondemand_read_duration_seconds_bucket{le="+Inf"}'] == "2"
    assert samples['ondemand_cache_bytes{frontend="fscache",image="img"}'] == str(2 * CHUNK)
    assert samples['ondemand_kernel_feature{feature="restore"}'] == "1"


async def test_trace_streams_the_request_flow(tmp_path):
    """/trace streams each request line as it happens; ?op= and ?image= filter them."""
    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(2 * CHUNK))
        d.add_image("other", os.urandom(CHUNK))
        reads = d.client.lines("/trace?op=READ&image=img")
        everything = ControlClient(d.socket).lines("/trace")
        assert (await asyncio.to_thread(next, reads))["event"] == "_subscribed"
        assert (await asyncio.to_thread(next, everything))["event"] == "_subscribed"
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        other = await d.kernel.open(b"other-data", b"erofs,dom")
        assert await d.kernel.read(other, 0, 4096)
        assert await d.kernel.read(obj, CHUNK, 8192)
        line = await asyncio.to_thread(next, reads)
        first = [await asyncio.to_thread(next, everything) for _ in range(4)]
    assert (line["op"], line["key"], line["off"], line["len"]) == ("READ", "img-data", CHUNK, 8192)
    assert line["outcome"] == "ok" and line["source"] == "local" and line["mono"] > 0
    # Each request is one line, and an object's OPEN comes before its READs; the order
    # across objects is not promised (their lines are written as their answers finish).
    seen = [(x["op"], x["key"]) for x in first]
    assert sorted(seen) == [("OPEN", "img-data"), ("OPEN", "other-data"),
                            ("READ", "img-data"), ("READ", "other-data")]
    for key in ("img-data", "other-data"):
        assert seen.index(("OPEN", key)) < seen.index(("READ", key))
    with pytest.raises(StopIteration):  # the daemon stopped: the stream ends
        next(reads)


async def test_trace_stream_outlives_a_quiet_spell_longer_than_the_timeout(tmp_path):
    """The client's timeout bounds the answer, not the stream: a trace with nothing to show
    for longer than it still gets the next line (it raised TimeoutError in the guest)."""
    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(CHUNK))
        lines = ControlClient(d.socket, timeout=0.2).lines("/trace")
        assert (await asyncio.to_thread(next, lines))["event"] == "_subscribed"
        waiting = asyncio.create_task(asyncio.to_thread(next, lines))
        await asyncio.sleep(0.6)  # three timeouts' worth of nothing
        assert not waiting.done()
        await d.kernel.open(b"img-data", b"erofs,dom")
        line = await asyncio.wait_for(waiting, 10)
    assert (line["op"], line["key"]) == ("OPEN", "img-data")


async def test_trace_command_prints_a_table(tmp_path, capsys, monkeypatch):
    """`ondemand-d trace --duration` prints the header and a row per request, then a count."""
    # In one process the command's own logging set-up would replace the daemon's.
    monkeypatch.setattr(log, "configure", lambda *a, **k: None)
    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(CHUNK))
        cmd = asyncio.create_task(asyncio.to_thread(
            cli.main, ["trace", "--socket", str(d.socket), "--duration", "1.5"]))
        await asyncio.sleep(0.5)
        obj = await d.kernel.open(b"img-data")
        assert await d.kernel.read(obj, 0, 4096)
        assert await cmd == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert rows[0].split()[:3] == ["time", "op", "msg"]
    assert [r.split()[1] for r in rows[1:]] == ["OPEN", "READ"]
    assert "trace: 2 line(s) shown" in err
    rc = cli.main(["trace", "--socket", str(tmp_path / "none"), "--duration", "1"])
    assert rc == 1


async def test_cull_unused_frees_closed_blobs_and_keeps_open_ones(tmp_path, capsys):
    """cull --unused: the kernel culls the closed object's file and refuses the open one."""
    async with Running(tmp_path) as d:
        d.add_image("a", os.urandom(2 * CHUNK))
        d.add_image("b", os.urandom(CHUNK))
        kept = await d.kernel.open(b"a-data", b"erofs,dom")
        gone = await d.kernel.open(b"b-data", b"erofs,dom")
        assert await d.kernel.read(kept, 0, 4096)
        assert await d.kernel.read(gone, 0, 4096)
        held = os.stat(gone.path).st_blocks * 512
        d.kernel.close(gone)
        await d.until_counted("CLOSE", 1)
        result = await asyncio.to_thread(d.client.post, "/cull", {"unused": True})
        with pytest.raises(ControlUnavailable, match="no image 'nope'"):
            await asyncio.to_thread(d.client.post, "/cull", {"image": "nope"})
        st = await d.get("/status")
    by_key = {f["key"]: f for f in result["files"]}
    assert by_key["b-data"]["outcome"] == "culled" and by_key["b-data"]["bytes"] == held
    assert by_key["a-data"]["outcome"] == "in_use"
    assert result["bytes_freed"] == held and held >= CHUNK
    assert not gone.path.exists() and kept.path.exists()
    assert list((tmp_path / "cache" / "graveyard").iterdir()) == []  # emptied
    # inuse first, then cull, for each file; the kernel refused the open one.
    assert sorted(c for c in d.kernel.commands if c.startswith((b"cull", b"inuse"))) == [
        b"cull Db-data", b"inuse Da-data", b"inuse Db-data"]
    images = {i["name"]: i for i in st["images"]}
    assert images["b"]["cached_bytes"] == 0 and images["a"]["cached_bytes"] == CHUNK


async def test_cull_image_through_the_command(tmp_path, capsys, monkeypatch):
    """`ondemand-d cull IMAGE` culls only that image's files and says how much it freed."""
    monkeypatch.setattr(log, "configure", lambda *a, **k: None)
    async with Running(tmp_path) as d:
        d.add_image("a", os.urandom(CHUNK))
        d.add_image("b", os.urandom(CHUNK))
        for key in (b"a-data", b"b-data"):
            obj = await d.kernel.open(key)
            assert await d.kernel.read(obj, 0, 4096)
            d.kernel.close(obj)
        await d.until_counted("CLOSE", 2)
        rc = await asyncio.to_thread(cli.main, ["cull", "a", "--socket", str(d.socket)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "culled 1 cache file(s), freed 1.0 MiB" in out
    assert d.kernel.cache_path(b"erofs,dom", b"b-data").exists()
    assert not d.kernel.cache_path(b"erofs,dom", b"a-data").exists()


def test_status_says_unknown_for_blobs_a_previous_instance_left_open(tmp_path):
    """After a restart (restored), a blob that is neither open nor linked under cache/ may be
    cached in a file the kernel still holds: status reports None (shown as ?), never 0."""
    from types import SimpleNamespace

    from ondemand_d.control import status as status_view

    store = LocalStore(tmp_path / "store")
    (tmp_path / "boot").write_bytes(os.urandom(5000))
    (tmp_path / "data").write_bytes(os.urandom(CHUNK))
    boot, data = (store.ingest_file(tmp_path / n).blob_id for n in ("boot", "data"))
    store.put_image(Image("img", boot, (("img-data", data),)))
    known = {boot: {"cached_bytes": 8192, "cache_files": 1}}
    for restored, want in ((True, None), (False, 0)):
        rt = SimpleNamespace(restored=restored, service=SimpleNamespace(store=store))
        (img,) = status_view.images(rt, known, open_blobs=set())
        b_boot, b_data = img["blobs"]
        assert (b_boot["cached_bytes"], b_data["cached_bytes"]) == (8192, want)
        assert img["cached_bytes"] == 8192
        assert img["cached_unknown"] == (1 if restored else 0)
