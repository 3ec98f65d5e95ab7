# SPDX-License-Identifier: Apache-2.0
"""Failover under load, with the shipped unit under systemd (issue 11, part 1).

Two images in one domain, eight readers reading every file in a loop, and
`systemctl kill -s KILL ondemand-d` two seconds after each instance is ready, for a minute;
the kill in the middle of a prefill and of a registry fetch are not here yet (see README).
Before each kill a cold file is read while the daemon holds the READs it takes
(ONDEMAND_D_TEST_HOLD_READS, only while /run/odg-hold exists), so every kill leaves READs
taken and never completed.

What the kernel did is counted from its own tracepoints (_cread when a daemon completes a
READ, by msg_id; CLOCK_MONOTONIC, like the test's clock): a READ the killed instance had
taken (its log named it as held) and that was completed after the instance was gone was
sent again to the successor by the kernel, after its `restore`. Nothing else could have
completed it.

Bounds: a reader's single file read may take at most READ_BOUND seconds. That is a hang
guard (no read blocks forever), far above what a read takes with a daemon restarting every
few seconds, not a speed claim.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from guestlib import drop_caches, errname, guard, mount_erofs, ondemand_d_argv, umount
from systemdlib import (
    Tracer,
    control,
    dropin,
    events,
    gone,
    install,
    main_pid,
    md5_tree,
    save_journal,
    systemctl,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.vm

IMAGES = ("fo-a", "fo-b")
DOMAIN = "fo"
READERS = 8
KILL_EVERY = 2.0      # seconds after each instance's READY
KILL_FOR = 60.0       # seconds of kill loop (the minimum)
READ_BOUND = 180.0    # hang guard for one file read, seconds
RESTART_BOUND = 240.0  # a successor's start under emulation, with eight readers busy


def prepare(base: Path) -> None:
    """fo-a and fo-b share a's files (one domain: their blobs are OPENed once); b has more."""
    rng = random.Random(23)
    trees = base / "trees"
    a, b = trees / "a", trees / "b"
    for i in range(48):
        body = rng.randbytes(rng.choice([4096, 60_000, 300_000, 900_000, 2_000_000]))
        for tree in (a, b):
            (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
            (tree / f"d{i % 4}" / f"f{i:02d}").write_bytes(body)
    for i in range(24):
        (b / "more").mkdir(parents=True, exist_ok=True)
        (b / "more" / f"m{i:02d}").write_bytes(rng.randbytes(rng.choice([8000, 700_000, 1_500_000])))
    store = base / "store"
    cli = [*ondemand_d_argv(), "--store", str(store)]
    for name, tree in (("fo-a", a), ("fo-b", b)):
        subprocess.run([*cli, "build", str(tree), "--name", name], check=True,
                       capture_output=True)
    (base / "manifest.json").write_text(json.dumps({
        "store": str(store), "trees": str(trees),
        "md5": {"fo-a": md5_tree(a), "fo-b": md5_tree(b)}}))


@pytest.fixture(scope="module")
def checks(guest: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    results = tmp_path_factory.mktemp("systemd-failover")
    prepare(results / "inputs")
    only = [n for n in os.environ.get("ODG_ONLY_CHECKS", "").split(",") if n]  # a debugging aid
    return guest.checks(__file__, only, results_dir=results, systemd=True)


def test_kill_loop_under_load(checks: Any) -> None:
    """A minute of kill -9 every 2 s of service: no reader error, no wrong byte, no read past
    the bound, and the kernel re-sent the READs the killed instances had taken."""
    data = checks.passed("check_kill_loop")
    print(f"\nkill loop: {data['kills']} kills in {data['loop_s']} s; readers read "
          f"{data['file_reads']} files ({data['bytes_read'] >> 20} MiB); read errors "
          f"{data['read_errors']}, wrong bytes {data['mismatches']}; longest read "
          f"{data['max_read_s']} s (bound {READ_BOUND} s); kernel READs {data['kernel_reads']}; "
          f"taken by a killed instance and completed by a successor (re-sent after restore): "
          f"{data['resent']} in {data['kills_with_resent']} kills")
    assert data["loop_s"] >= KILL_FOR and data["kills"] >= 2
    assert data["read_errors"] == 0 and data["mismatches"] == 0
    assert data["readers_done"] == READERS
    assert data["max_read_s"] < READ_BOUND
    assert data["file_reads"] > 0
    assert data["resent"] == data["taken"] > 0  # every READ held at a kill came back
    assert data["kills_with_resent"] == data["kills"]
    assert data["probes"] == ["ok"] * data["kills"]
    assert data["final_files_ok"] == data["final_files"]


# ---------------------------------------------------------------- guest side (runs as root)

_state: dict[str, Any] = {}


def _inputs(ctx: Any) -> dict[str, Any]:
    return json.loads((ctx.out.parent / "inputs" / "manifest.json").read_text())


def _mount(name: str, fsid: str, domain: str) -> None:
    rc = mount_erofs(f"/mnt/{name}", fsid, domain=domain, timeout=90)
    assert rc == 0, f"mount {fsid}: {errname(rc)}"


def _compare(mnt: str, want: dict[str, str]) -> int:
    got = md5_tree(Path(mnt))
    bad = sorted(k for k in want if got.get(k) != want[k])
    assert not bad, f"{mnt}: wrong or missing {bad[:5]}"
    return len(want)


_READER = """\
import errno, hashlib, json, os, sys, time
want = json.loads(open(sys.argv[1]).read())   # path -> md5
stop, out, k = sys.argv[2], sys.argv[3], int(sys.argv[4])
paths = sorted(want)
paths = paths[k * len(paths) // 8:] + paths[:k * len(paths) // 8]
res = {"reads": 0, "bytes": 0, "errors": [], "mismatches": [], "max_s": 0.0, "slowest": None}
def save():
    tmp = out + ".tmp"
    open(tmp, "w").write(json.dumps(res))
    os.replace(tmp, out)
while not os.path.exists(stop):
    for p in paths:
        if os.path.exists(stop):
            break
        t = time.monotonic()
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            res["errors"].append([p, errno.errorcode.get(e.errno, str(e.errno))])
            continue
        finally:
            dt = time.monotonic() - t
            if dt > res["max_s"]:
                res["max_s"], res["slowest"] = round(dt, 3), p
        res["reads"] += 1
        res["bytes"] += len(data)
        if hashlib.md5(data).hexdigest() != want[p]:
            res["mismatches"].append(p)
        time.sleep(0.2)  # two emulated cores: leave the restarting daemon room to start
    save()
save()
"""


def _pending_resent(trace: list[dict[str, Any]], kills: list[dict[str, Any]]) -> tuple[int, int]:
    """(READs re-sent, kills that had some): taken by a killed instance, completed after."""
    completed: dict[int, list[float]] = {}
    for ev in trace:
        if ev["event"] == "cread" and "mid" in ev:
            completed.setdefault(ev["mid"], []).append(ev["ts"])
    total = kills_with = 0
    for kill in kills:
        n = sum(1 for mid in kill["inflight"]
                if any(ts > kill["t_dead"] for ts in completed.get(mid, [])))
        kill["resent"] = n
        total += n
        kills_with += n > 0
    return total, kills_with


def _snapshot_inflight() -> list[int]:
    try:
        return [r["msg_id"] for r in control().get("/inflight")["reads"]]
    except Exception:  # noqa: BLE001 - a daemon just starting has no socket yet: nothing taken
        return []


def _kill(pid: int) -> dict[str, Any]:
    inflight = _snapshot_inflight()
    t_kill = time.monotonic()
    systemctl("kill", "-s", "KILL", "ondemand-d")
    wait_for(lambda: gone(pid), f"pid {pid} to die", 20, every=0.01)
    return {"pid": pid, "t_kill": t_kill, "t_dead": time.monotonic(), "inflight": inflight}


@guard(180)
def check_setup(ctx: Any) -> None:
    inp = _inputs(ctx)
    _state["inp"] = inp
    install(Path(inp["store"]), ctx.cache / "fscache", settings={"readahead": "0"})
    systemctl("start", "ondemand-d")
    for name in IMAGES:
        _mount(name, name, DOMAIN)


HOLD = Path("/run/odg-hold")


@guard(600)
def check_kill_loop(ctx: Any) -> None:
    """Readers loop over the warm files; before each kill a cold file (fo-b/more/) is read
    while the daemon holds its READs (ONDEMAND_D_TEST_HOLD_READS, only while HOLD exists),
    so every kill leaves READs taken and never completed for the kernel to re-send."""
    inp = _state["inp"]
    md5 = {f"/mnt/{n}/{rel}": m for n in IMAGES for rel, m in inp["md5"][n].items()}
    cold = sorted(p for p in md5 if p.startswith("/mnt/fo-b/more/"))
    want = {p: m for p, m in md5.items() if p not in cold}
    (ctx.tmp / "want.json").write_text(json.dumps(want))
    dropin("hold", f"[Service]\nEnvironment=ONDEMAND_D_TEST_HOLD_READS={HOLD}\n")
    old = main_pid()
    systemctl("restart", "ondemand-d")
    pid = wait_ready(old, timeout=RESTART_BOUND)
    stop = ctx.tmp / "stop"
    tracer = Tracer("odg-killloop").start()
    drop_caches()
    readers = [subprocess.Popen([sys.executable, "-c", _READER, str(ctx.tmp / "want.json"),
                                 str(stop), str(ctx.tmp / f"reader{k}.json"), str(k)])
               for k in range(READERS)]
    kills: list[dict[str, Any]] = []
    probes: list[str] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < KILL_FOR and cold:
            time.sleep(KILL_EVERY)
            HOLD.touch()
            probe = cold.pop(0)
            child = subprocess.Popen([sys.executable, "-c", _MD5, probe],
                                     stdout=subprocess.PIPE, text=True)
            held = wait_for(lambda p=pid: [e["msg_id"] for e in events("test_fault_holding", p)],
                            "a held READ", 120, every=0.2)
            t_kill = time.monotonic()
            systemctl("kill", "-s", "KILL", "ondemand-d")
            wait_for(lambda p=pid: gone(p), f"pid {pid} to die", 20, every=0.01)
            t_dead = time.monotonic()
            HOLD.unlink()
            kills.append({"pid": pid, "t_kill": t_kill, "t_dead": t_dead, "inflight": held})
            pid = wait_ready(pid, timeout=RESTART_BOUND)
            out, _ = child.communicate(timeout=READ_BOUND)
            probes.append("ok" if out.strip() == md5[probe] else f"{probe}: {out.strip()!r}")
        loop_s = time.monotonic() - started
    finally:
        HOLD.unlink(missing_ok=True)
        stop.touch()
        done = 0
        for proc in readers:
            try:
                proc.wait(READ_BOUND + 30)
                done += proc.returncode == 0
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        trace = tracer.stop()
    results = [json.loads((ctx.tmp / f"reader{k}.json").read_text()) for k in range(READERS)
               if (ctx.tmp / f"reader{k}.json").exists()]
    resent, kills_with = _pending_resent(trace, kills)
    ctx.data.update(
        kills=len(kills), loop_s=round(loop_s, 1), readers_done=done, probes=probes,
        file_reads=sum(r["reads"] for r in results), bytes_read=sum(r["bytes"] for r in results),
        read_errors=sum(len(r["errors"]) for r in results) + sum(p != "ok" for p in probes),
        errors=[e for r in results for e in r["errors"]][:10],
        mismatches=sum(len(r["mismatches"]) for r in results),
        max_read_s=max((r["max_s"] for r in results), default=None),
        kernel_reads=sum(ev["event"] == "read" for ev in trace),
        kernel_completions=sum(ev["event"] == "cread" for ev in trace),
        trace_overrun=tracer.overrun, resent=resent, kills_with_resent=kills_with,
        taken=sum(len(k["inflight"]) for k in kills),
        per_kill=[{k: v for k, v in kill.items() if k != "inflight"} | {
            "taken": len(kill["inflight"])} for kill in kills],
    )
    (Path("/etc/systemd/system/ondemand-d.service.d") / "hold.conf").unlink()
    systemctl("daemon-reload")
    drop_caches()
    ctx.data["final_files"] = len(md5)
    ctx.data["final_files_ok"] = sum(_compare(f"/mnt/{n}", inp["md5"][n]) for n in IMAGES)


_MD5 = "import sys, hashlib; print(hashlib.md5(open(sys.argv[1], 'rb').read()).hexdigest())"


def teardown() -> None:
    save_journal()
    systemctl("stop", "ondemand-d", check=False)
    for name in IMAGES:
        umount(f"/mnt/{name}")
