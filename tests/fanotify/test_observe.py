# SPDX-License-Identifier: Apache-2.0
"""What a running daemon says about its fanotify events: status, /metrics, STATUS=, trace,
and how much of it goes to the log (a real daemon, a real mount, real reads)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ondemand_d import cli
from ondemand_d.store.local import LocalStore

from ..registry._proxy import Fault, FaultProxy
from ..registry._server import Registry
from .conftest import Daemon, build, tree
from .test_failover import drop_cache
from .test_mount import make_tree
from .test_registry import pending_reads, proxy, publish, registry  # noqa: F401 - fixtures

WAIT_S = 60.0  # a bound on waiting for the daemon, never an assertion about speed


def allocated(root: Path) -> int:
    """What the blob files under `root` hold on disk (st_blocks), measured by the test."""
    return sum(p.stat().st_blocks * 512 for p in root.iterdir() if p.is_file())


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def start(workdir: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    """A daemon without readahead: after the reads, nothing fills in the background."""
    d = Daemon(workdir, workdir / "store", env={"ONDEMAND_D_READAHEAD": "0", **(env or {})})
    d.argv = [*d.command(), *extra]
    return d.start()


def notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    return sock


def status_line(sock: socket.socket, wanted: str) -> str:
    """The first STATUS= the daemon sends that contains `wanted` (fds it stores are closed)."""
    deadline = time.monotonic() + WAIT_S
    seen = []
    while time.monotonic() < deadline:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 65536, 64)
        except TimeoutError:
            continue
        for fd in fds:
            os.close(fd)
        for line in msg.decode().splitlines():
            if line.startswith("STATUS="):
                seen.append(line)
                if wanted in line:
                    return line[len("STATUS="):]
    raise AssertionError(f"no STATUS= with {wanted!r}: {seen[-3:]}")


def test_events_fills_and_bytes_are_counted_everywhere(workdir: Path, capsys) -> None:
    """After reading a mount: status (JSON and text), /metrics (promtool-clean, with a
    frontend label), STATUS= and the ready line count fanotify's events, fills, bytes and
    errors, and name no /dev/cachefiles on a host without it."""
    assert not Path("/dev/cachefiles").exists(), "this test is about a host without fscache"
    notify = notify_socket(workdir / "notify")
    LocalStore(workdir / "store")
    src = make_tree(workdir / "src", seed=31)
    build(workdir / "store", src, "app", "--chunk-size", "64K")
    daemon = start(workdir, env={"NOTIFY_SOCKET": str(workdir / "notify"),
                                 "WATCHDOG_USEC": "1000000"})
    try:
        mnt = workdir / "mnt"
        daemon.mount("app", mnt)
        assert tree(mnt) == tree(src)
        drop_cache(mnt)
        assert tree(mnt) == tree(src)  # again: now from what is filled
        st = daemon.client.get("/status")
        text = daemon.client.text("/metrics")
        assert cli.main(["status", "--socket", str(daemon.socket)]) == 0
        human = capsys.readouterr().out
        assert cli.main(["status", "--socket", str(daemon.socket), "--json"]) == 0
        as_json = json.loads(capsys.readouterr().out)
        fan = st["frontends"]["fanotify"]
        line = status_line(notify, f"events={fan['events']} ")
    finally:
        daemon.stop()
        notify.close()
    # status: every event answered, the second read from what the first filled.
    assert fan["events"] > 0 and fan["denied"] == 0 and fan["read_errors"] == {}
    assert fan["fills"] > 0 and fan["already_filled"] > 0
    assert sum(r["count"] for r in fan["reads"]) == fan["events"]
    assert fan["already_filled"] + fan["fills"] == fan["events"]
    event_bytes = sum(r["bytes"] for r in fan["reads"])
    assert 0 < event_bytes <= fan["bytes_filled"]
    assert as_json["frontends"]["fanotify"]["events"] == fan["events"]
    # The fills are the info lines; the already-filled events are not in an info log.
    info = daemon.reads()
    assert len(info) == fan["fills"]
    assert all(r["source"] != "filled" for r in info)
    # The kernel line: fanotify's features, not fscache's.
    assert st["kernel"]["fscache"] is False and st["kernel"]["fanotify_pre_content"] is True
    assert "restore" not in st["kernel"] and st["device"] is None
    assert "fanotify (pre-content events)" in human and "restore" not in human
    assert f"fanotify events since start: {fan['events']} " in human
    # /metrics: promtool accepts it; the values are the front end's.
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: scripts/install-deps"
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode() + text
    got = samples(text)
    fa = 'frontend="fanotify"'
    assert got[f"ondemand_events_total{{{fa}}}"] == str(fan["events"])
    assert got[f'ondemand_requests_total{{{fa},op="READ",outcome="ok"}}'] == str(fan["events"])
    assert got[f'ondemand_reads_total{{{fa},source="filled",outcome="ok"}}'] == str(
        fan["already_filled"])
    assert sum(int(v) for k, v in got.items()
               if k.startswith(f"ondemand_read_bytes_total{{{fa},")) == event_bytes
    assert got[f"ondemand_fill_bytes_total{{{fa}}}"] == str(fan["bytes_filled"])
    blob_files = allocated(workdir / "cache" / "fanotify" / "app")
    assert blob_files > 0
    assert got[f'ondemand_cache_bytes{{{fa},domain="app"}}'] == str(blob_files)
    assert got['ondemand_kernel_feature{feature="fanotify_pre_content"}'] == "1"
    assert 'ondemand_kernel_feature{feature="restore"}' not in got
    assert not any('frontend="fscache"' in k for k in got)  # nothing counted for fscache
    # STATUS=: fanotify's counters, no fscache part (reads=0 said nothing true).
    assert line == (f"fanotify: mounts=1 events={fan['events']} fills={fan['fills']} "
                    f"bytes_filled={fan['bytes_filled']} denied=0")
    (ready,) = [r for r in daemon.lines() if r.get("event") == "ready"]
    assert ready["frontends"] == ["fanotify"] and "device" not in ready


def test_already_filled_events_are_debug(workdir: Path) -> None:
    """At --log-level debug each already-filled event has its line (source: filled), one
    per event the front end counted as such."""
    LocalStore(workdir / "store")
    src = make_tree(workdir / "src", seed=32)
    build(workdir / "store", src, "app", "--chunk-size", "64K")
    daemon = start(workdir, "--log-level", "debug")
    try:
        mnt = workdir / "mnt"
        daemon.mount("app", mnt)
        assert tree(mnt) == tree(src)
        drop_cache(mnt)
        assert tree(mnt) == tree(src)
        fan = daemon.client.get("/fanotify")
    finally:
        daemon.stop()
    filled = [r for r in daemon.reads() if r["source"] == "filled"]
    assert fan["already_filled"] > 0
    assert len(filled) == fan["already_filled"]
    assert all(r["level"] == "debug" and r["bytes"] == 0 for r in filled)


class Lines:
    """A child's stdout, line by line, read in a thread (waits are bounded, not timed)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                self.q.put(line.rstrip("\n"))
            self.q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self) -> str:
        line = self.q.get(timeout=WAIT_S)
        assert line is not None, "the trace command ended"
        return line


def test_trace_shows_every_fanotify_event(workdir: Path) -> None:
    """`ondemand-d trace` prints a table row for every fanotify event, the already-filled
    ones too (their log line is debug), with no traceback (it died on the first one)."""
    LocalStore(workdir / "store")
    src = make_tree(workdir / "src", seed=33)
    build(workdir / "store", src, "app", "--chunk-size", "64K")
    daemon = start(workdir)
    trace = None
    try:
        mnt = workdir / "mnt"
        daemon.mount("app", mnt)
        trace = subprocess.Popen(
            [sys.executable, "-m", "ondemand_d", "trace", "--socket", str(daemon.socket)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = Lines(trace)
        assert lines.next().split()[:3] == ["time", "op", "msg"]  # printed once subscribed
        assert tree(mnt) == tree(src)
        drop_cache(mnt)
        assert tree(mnt) == tree(src)
        events = daemon.client.get("/fanotify")["events"]
        rows: list[str] = []
        while sum(1 for r in rows if _is_read(r)) < events:
            rows.append(lines.next())
    finally:
        if trace is not None:
            trace.terminate()
            _, err = trace.communicate(timeout=WAIT_S)
        daemon.stop()
    assert "Traceback" not in err, err
    reads = [r.split() for r in rows if _is_read(r)]
    assert len(reads) == events
    # time, op, msg, key (a blank object id for fanotify), off, len, chunks, source, ms, outcome
    assert all(c[1] == "READ" and c[3].startswith("app/") and c[-1] == "ok" for c in reads)
    assert any(c[7] == "filled" for c in reads)
    assert any(c[7] in ("local", "joined") for c in reads)


def _is_read(row: str) -> bool:
    return row.split()[1:2] == ["READ"]


def test_log_target_stderr(workdir: Path) -> None:
    """`serve --log-target stderr` writes its log to stderr and nothing to stdout."""
    LocalStore(workdir / "store")
    out, err = workdir / "stdout", workdir / "stderr"
    cmd = [sys.executable, "-m", "ondemand_d", "--store", str(workdir / "store"), "serve",
           "--cache-dir", str(workdir / "cache"), "--control-socket", str(workdir / "ctl"),
           "--log-format", "json", "--log-target", "stderr"]
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e)
        try:
            deadline = time.monotonic() + WAIT_S
            while b'"event": "ready"' not in err.read_bytes():
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "the daemon did not get ready"
                time.sleep(0.05)
        finally:
            proc.terminate()
            assert proc.wait(timeout=WAIT_S) == 0
    assert out.read_bytes() == b""
    events = [json.loads(line)["event"] for line in err.read_text().splitlines()]
    assert "ready" in events and events[-1] == "stopped"


async def test_inflight_and_errors_of_a_stalled_event(
        daemon: Daemon, workdir: Path, registry: Registry, proxy: FaultProxy,  # noqa: F811
        capsys) -> None:
    """A reader held by a stalled registry is an `inflight` row (fanotify, waiting for its
    fill, its pid); once umount answers it with EIO, status and /metrics count the error."""
    src = make_tree(workdir / "src", seed=34)
    await publish(src, workdir, registry, proxy, daemon.store, "slow")
    slow = workdir / "slow"
    await asyncio.to_thread(daemon.mount, "slow", slow)
    proxy.faults.append(Fault("delay", times=1000, seconds=120))
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"open({str(slow / 'large.bin')!r}, 'rb').read()",
        stderr=subprocess.PIPE)
    for _ in range(int(WAIT_S / 0.05)):
        if await pending_reads(daemon, slow):
            break
        await asyncio.sleep(0.05)
    view = await asyncio.to_thread(daemon.client.get, "/inflight")
    assert await asyncio.to_thread(
        cli.main, ["inflight", "--socket", str(daemon.socket)]) == 0
    table = capsys.readouterr().out
    await asyncio.to_thread(daemon.umount, slow)
    _, err = await asyncio.wait_for(reader.communicate(), WAIT_S)
    assert reader.returncode != 0 and b"Input/output error" in err
    fan = await asyncio.to_thread(daemon.client.get, "/fanotify")
    text = await asyncio.to_thread(daemon.client.text, "/metrics")
    rows = [r for r in view["reads"] if r["frontend"] == "fanotify"]
    assert rows and all(r["waits_on"] == "fill" and r["key"].startswith("slow/")
                        and r["object_id"] is None for r in rows)
    assert reader.pid in {r["pid"] for r in rows}
    assert str(rows[0]["msg_id"]) in table and "fill" in table
    assert fan["denied"] >= 1 and sum(fan["read_errors"].values()) == fan["denied"]
    got = samples(text)
    errors = {k: int(v) for k, v in got.items()
              if k.startswith('ondemand_read_errors_total{frontend="fanotify",')}
    assert sum(errors.values()) == fan["denied"]
    assert int(got['ondemand_requests_total{frontend="fanotify",op="READ",outcome="eio"}']) \
        == fan["denied"]
