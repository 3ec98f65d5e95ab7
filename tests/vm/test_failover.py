# SPDX-License-Identifier: Apache-2.0
"""Failover on the real kernel: a killed daemon's successor adopts the device and `restore`s.

The test plays systemd's part: it is the NOTIFY_SOCKET, receives the bound
/dev/cachefiles fd that ondemand-d hands to the fd store, and after a kill -9
starts the next instance with that fd as LISTEN_FDS. The mount stays up
throughout: files not cached before the kill read correctly afterwards,
through the new instance, without a remount (Linux 6.8+).

The first instance is killed with a READ pending: it took the READ from the device and
never completed it (the ONDEMAND_D_TEST_HOLD_READS fault, ondemand_d/faults.py). What is
asserted is what the kernel did, from its tracepoints: that READ (same msg_id) was completed
after the first instance was dead, which only a re-send to the successor after `restore`
makes possible, and the reader blocked on it got the right bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from guestlib import (
    errname,
    guard,
    mount_erofs,
    ondemand_d_argv,
    read_in_child,
    tree_digests,
    umount,
)
from systemdlib import Tracer

pytestmark = pytest.mark.vm


def prepare(base: Path) -> None:
    tree = base / "tree"
    rng = random.Random(7)
    for i in range(40):
        sub = tree / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:02d}").write_bytes(rng.randbytes(rng.choice([5000, 200_000, 1_300_000])))
    store = base / "store"
    subprocess.run([*ondemand_d_argv(), "--store", str(store), "build", str(tree), "--name", "fo"],
                   check=True, capture_output=True)
    (base / "manifest.json").write_text(json.dumps({"store": str(store), "tree": str(tree),
                                                    "digests": tree_digests(tree)}))


@pytest.fixture(scope="module")
def checks(guest: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    results = tmp_path_factory.mktemp("failover")
    prepare(results / "inputs")
    return guest.checks(__file__, results_dir=results)


def test_successor_adopts_device_and_serves_without_remount(checks: Any) -> None:
    """kill -9 with a READ pending; the kernel re-sends it to the successor after `restore`."""
    data = checks.passed("check_failover")
    held = data["held_msg_id"]
    # The kernel created the READ before the kill, and it was completed after the first
    # instance was gone (never before): the kernel sent it again to the successor.
    assert data["kernel_reads_before_kill"] >= 1
    assert data["completions_before_death"] == 0
    assert data["completions_after_death"] >= 1
    assert held in data["successor_completed"]
    assert data["blocked_reader"] == "ok"
    assert data["files_compared"] == data["files_expected"]


# ---------------------------------------------------------------- guest side (runs as root)


def _serve_argv(inp: dict[str, Any], ctx: Any) -> list[str]:
    return [*ondemand_d_argv(), "--store", inp["store"], "serve", "--cache-dir",
            str(ctx.cache / "fscache"), "--tag", "failover", "--log-format", "json",
            "--readahead", "0"]


def _events(log: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def _wait_for(pred: Any, what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


_SHA256 = "import sys, hashlib; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


@guard(300)
def check_failover(ctx: Any) -> None:
    inp = json.loads((ctx.out.parent / "inputs" / "manifest.json").read_text())
    notify_path = ctx.tmp / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(1)
    stored: list[int] = []
    ready: list[bytes] = []

    def drain_notify() -> bool:
        try:
            msg, fds, _, _ = socket.recv_fds(notify, 4096, 4)
        except (TimeoutError, BlockingIOError):
            return False
        if msg.startswith(b"FDSTORE=1"):
            stored.extend(fds)
        ready.append(msg)
        return any(m.startswith(b"READY=1") for m in ready)

    tracing = Path("/sys/kernel/tracing")
    if not (tracing / "instances").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracing)], check=True)
    tracer = Tracer("odg-failover").start()
    log1 = ctx.out / "first.log"
    hold = ctx.tmp / "hold"  # while it exists, the first instance completes no READ
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    with log1.open("wb") as out:
        first = subprocess.Popen(_serve_argv(inp, ctx), stdout=out, stderr=subprocess.STDOUT,
                                 env={**env, "ONDEMAND_D_TEST_HOLD_READS": str(hold)})
    _wait_for(drain_notify, "READY=1 from the first instance")
    assert len(stored) == 1, f"expected the device fd in the fd store, got {ready}"
    rc = mount_erofs("/mnt/fo", "fo", domain="fo", timeout=60)
    assert rc == 0, f"mount failed: {errname(rc)}"
    want = inp["digests"]
    names = sorted(want)
    victim = names[0]
    hold.touch()
    # This read blocks: the first instance takes its READ and holds it.
    reader = subprocess.Popen([sys.executable, "-c", _SHA256, f"/mnt/fo/{victim}"],
                              stdout=subprocess.PIPE, text=True)
    (held,) = _wait_for(lambda: _events(log1, "test_fault_holding")[:1],
                        "the first instance to hold a READ")
    ctx.data["held_msg_id"] = held["msg_id"]
    t_kill = time.monotonic()
    first.send_signal(signal.SIGKILL)
    first.wait()
    t_dead = time.monotonic()
    assert reader.poll() is None, "the read finished without a daemon to complete it"

    log2 = ctx.out / "second.log"
    # The successor gets the stored fd as fd 3, as systemd passes LISTEN_FDS.
    adopt = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
             "os.environ['LISTEN_PID'] = str(os.getpid()); os.execvp(sys.argv[2], sys.argv[2:])")
    env2 = {**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "cachefiles"}
    with log2.open("wb") as out:
        second = subprocess.Popen(
            [ondemand_d_argv()[0], "-c", adopt, str(stored[0]), *_serve_argv(inp, ctx)],
            stdout=out, stderr=subprocess.STDOUT, env=env2, pass_fds=(stored[0],))
    try:
        (line,) = _wait_for(lambda: _events(log2, "ready"), "the second instance's ready line")
        ctx.data["restored"] = line.get("restored")
        got, _ = reader.communicate(timeout=60)
        ctx.data["blocked_reader"] = "ok" if got.strip() == want[victim] else "wrong bytes"
        compared = 0
        for name in names:
            status, data = read_in_child(f"/mnt/fo/{name}", timeout=60)
            assert status == "ok", f"{name}: {status} after the restart\n{log2.read_text()[-2000:]}"
            assert hashlib.sha256(data).hexdigest() == want[name], f"{name}: wrong bytes"
            compared += 1
        ctx.data["files_expected"] = len(want)
        ctx.data["files_compared"] = compared
        ctx.data["successor_completed"] = [e.get("msg_id") for e in
                                           _events(log2, "read_completed")]
        assert umount("/mnt/fo") == 0
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
        for fd in stored:
            os.close(fd)
        notify.close()
        trace = tracer.stop()
    mid = held["msg_id"]
    # The read tracepoint fires when the kernel creates a READ, before it has a msg_id.
    ctx.data["kernel_reads_before_kill"] = sum(ev["event"] == "read" and ev["ts"] < t_kill
                                               for ev in trace)
    ctx.data["trace_sample"] = trace[:6]
    creads = [ev["ts"] for ev in trace if ev["event"] == "cread" and ev.get("mid") == mid]
    ctx.data["completions_before_death"] = sum(ts < t_dead for ts in creads)
    ctx.data["completions_after_death"] = sum(ts > t_dead for ts in creads)
    ctx.data["trace_events"] = len(trace)
