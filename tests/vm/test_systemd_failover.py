# SPDX-License-Identifier: Apache-2.0
"""Failover under load, with the shipped unit under systemd (issue 11, part 1).

Two images in one domain, eight readers reading every file in a loop, and
`systemctl kill -s KILL ondemand-d` two seconds after each instance is ready, for a minute.
Then a kill in the middle of a bootstrap prefill and one in the middle of a registry fetch.
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

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from guestlib import (
    drop_caches,
    errname,
    guard,
    mount_erofs,
    ondemand_d_argv,
    registry_config,
    start_registry,
    umount,
)
from systemdlib import (
    Tracer,
    control,
    dropin,
    events,
    gone,
    CACHE,
    DROPIN,
    STORE,
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
COLD_FILES = 36       # more than a minute of kills can use (about 8 s a cycle, seen)
P_FILES = 7000
GUEST_REGISTRY = "127.0.0.1:5056"
REGISTRY_REPO = "fo/r:v1"


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
    # The cold files, one per kill: READs fill whole 1 MiB chunks, so each is over 2 MiB to
    # keep a chunk of its own that no neighbour's READ has filled before its turn.
    for i in range(COLD_FILES):
        (b / "more").mkdir(parents=True, exist_ok=True)
        (b / "more" / f"m{i:02d}").write_bytes(rng.randbytes((9 << 20) // 4 + 1000 * i))
    # fo-p: a bootstrap of more than one chunk (about 1.4 MiB of inodes and long names), so
    # the mount's first READ fills only its first chunk and a walk needs more of it.
    p = trees / "p"
    for i in range(P_FILES):
        (p / f"d{i % 20:02d}").mkdir(parents=True, exist_ok=True)
        (p / f"d{i % 20:02d}" / f"a-name-long-enough-to-fill-directory-blocks-{i:05d}"
         ).write_bytes(rng.randbytes(rng.choice([100, 900, 3000])))
    # fo-r: pushed to a registry and added in the guest through a proxy that can stall.
    r = trees / "r"
    for i in range(6):
        (r / "bin").mkdir(parents=True, exist_ok=True)
        (r / "bin" / f"r{i}").write_bytes(rng.randbytes(rng.choice([300_000, 3_000_000])))
    store = base / "store"
    cli = [*ondemand_d_argv(), "--store", str(store)]
    for name, tree in (("fo-a", a), ("fo-b", b), ("fo-p", p)):
        subprocess.run([*cli, "build", str(tree), "--name", name], check=True,
                       capture_output=True)
    registry_store = base / "registry-store"  # fo-r lives only in the registry
    subprocess.run([*ondemand_d_argv(), "--store", str(registry_store), "build", str(r),
                    "--name", "fo-r"], check=True, capture_output=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from registry._server import start_registry, stop_registry  # the registry tests' helper

    registry = start_registry(base / "registry")
    try:
        subprocess.run([*ondemand_d_argv(), "--store", str(registry_store), "push", "fo-r",
                        f"{registry.host}/{REGISTRY_REPO}"], check=True, capture_output=True)
    finally:
        stop_registry(registry)
    registry_config(base / "guest-registry.yml", base / "registry" / "storage", GUEST_REGISTRY)
    listing = json.loads(subprocess.run([*cli, "ls", "--json"], check=True, capture_output=True,
                                        text=True).stdout)
    blobs = {i["name"]: {b["role"]: b["blob"] for b in i["blobs"]} for i in listing["images"]}
    (base / "manifest.json").write_text(json.dumps({
        "store": str(store), "trees": str(trees), "blobs": blobs,
        "md5": {"fo-a": md5_tree(a), "fo-b": md5_tree(b), "fo-p": md5_tree(p),
                "fo-r": md5_tree(r)}}))


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


def test_kill_in_the_middle_of_a_prefill(checks: Any) -> None:
    """kill -9 while a bootstrap's prefill has written part of its metadata and a READ of
    that bootstrap is held: the kernel re-sends the READ, which re-OPENs the bootstrap in the
    successor; its prefill writes only the holes left, and every file of the image is right."""
    data = checks.passed("check_kill_mid_prefill")
    print(f"\nmid-prefill kill: the killed prefill wrote {data['killed_wrote']} bytes of the "
          f"bootstrap and was held; the successor re-OPENed it and its prefill wrote "
          f"{data['successor_wrote']}; READs held at the kill {data['taken']}, completed by "
          f"the successor {data['resent']}; files right {data['files_ok']}/{data['files']}; "
          f"the bootstrap's cache file: {data['cache_file_data']} bytes of data, wrong "
          f"{data['cache_file_wrong']}")
    assert data["killed_wrote"] > 0
    assert data["bootstrap_reopened"] is True and data["successor_outcome"] == "ok"
    # What the killed prefill left in the cache file is right, byte for byte, and so is
    # everything written since (the kernel serves these bytes without asking again).
    assert data["cache_file_data"] > 0 and data["cache_file_wrong"] == []
    assert data["resent"] == data["taken"] > 0
    assert data["probe"] == "ok"
    assert data["files_ok"] == data["files"]


def test_kill_in_the_middle_of_a_registry_fetch(checks: Any) -> None:
    """kill -9 while a READ waits on a registry response that stalled halfway: the kernel
    re-sends the READ, the successor fetches the chunk again, and the store stays clean."""
    data = checks.passed("check_kill_mid_registry_fetch")
    print(f"\nmid-fetch kill: READs waiting on the registry at the kill {data['taken']} "
          f"({data['waits_on']}), completed by the successor {data['resent']}; bytes the "
          f"stalled response sent before the kill: half of its body; the successor's registry "
          f"READs {data['successor_remote_reads']}; files right {data['files_ok']}/"
          f"{data['files']}; fsck: {data['fsck']}")
    assert data["resent"] == data["taken"] > 0
    assert set(data["waits_on"]) == {"fetch"}
    # `ondemand-d inflight` showed each of them, waiting on the fetch.
    listed = [line.split() for line in data["inflight_cli"][1:]]  # under its header
    assert sorted(int(cols[0]) for cols in listed) == sorted(data["taken_ids"])
    assert all(cols[3] == "fetch" for cols in listed), data["inflight_cli"]
    assert data["probe"] == "ok"
    assert data["successor_remote_reads"] > 0
    assert data["files_ok"] == data["files"]
    assert data["fsck_rc"] == 0


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
            kills.append(_kill_holding(pid))
            HOLD.unlink()
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
    (DROPIN / "hold.conf").unlink()
    systemctl("daemon-reload")
    drop_caches()
    ctx.data["final_files"] = len(md5)
    ctx.data["final_files_ok"] = sum(_compare(f"/mnt/{n}", inp["md5"][n]) for n in IMAGES)


_MD5 = "import sys, hashlib; print(hashlib.md5(open(sys.argv[1], 'rb').read()).hexdigest())"

HOLD_BACKGROUND = Path("/run/odg-hold-bg")
# Metadata only: every inode of the tree, no file data.
_WALK = """
import os, sys
print(sum(os.lstat(os.path.join(d, f)) is not None for d, _, fs in os.walk(sys.argv[1])
          for f in fs))
"""


def _restart_with_holds() -> int:
    dropin("hold", "[Service]\n"
           f"Environment=ONDEMAND_D_TEST_HOLD_READS={HOLD}\n"
           f"Environment=ONDEMAND_D_TEST_HOLD_BACKGROUND={HOLD_BACKGROUND}\n")
    old = main_pid()
    systemctl("restart", "ondemand-d")
    return wait_ready(old, timeout=RESTART_BOUND)


def _kill_holding(pid: int) -> dict[str, Any]:
    """Wait for a READ to be held (ONDEMAND_D_TEST_HOLD_READS), then kill -9 the instance."""
    held = wait_for(lambda: [e["msg_id"] for e in events("test_fault_holding", pid)],
                    "a held READ", 120, every=0.2)
    return _kill_now(pid, held)


def _kill_now(pid: int, taken: list[int]) -> dict[str, Any]:
    t_kill = time.monotonic()
    systemctl("kill", "-s", "KILL", "ondemand-d")
    wait_for(lambda: gone(pid), f"pid {pid} to die", 20, every=0.01)
    return {"pid": pid, "t_kill": t_kill, "t_dead": time.monotonic(), "inflight": taken}


def _no_holds() -> None:
    HOLD.unlink(missing_ok=True)
    HOLD_BACKGROUND.unlink(missing_ok=True)
    (DROPIN / "hold.conf").unlink(missing_ok=True)
    systemctl("daemon-reload")


@guard(600)
def check_kill_mid_prefill(ctx: Any) -> None:
    """The bootstrap prefill is held halfway (ONDEMAND_D_TEST_HOLD_BACKGROUND),
    a lookup's READ is held too, and the instance is killed: the kernel re-sends the READ
    (re-OPENing the bootstrap first), and the successor's prefill fills only the holes."""
    inp = _state["inp"]
    bootstrap = inp["blobs"]["fo-p"]["bootstrap"]
    pid = _restart_with_holds()
    tracer = Tracer("odg-midprefill").start()
    try:
        HOLD_BACKGROUND.touch()
        _mount("fo-p", "fo-p", "pf")
        wait_for(lambda: events("test_fault_holding_background", pid),
                 "the prefill to be held", 120, every=0.2)
        HOLD.touch()
        child = subprocess.Popen([sys.executable, "-c", _WALK, "/mnt/fo-p"],
                                 stdout=subprocess.PIPE, text=True)
        kill = _kill_holding(pid)
        holding = events("test_fault_holding_background", pid)
        _no_holds()
        successor = wait_ready(pid, timeout=RESTART_BOUND)
        out, _ = child.communicate(timeout=READ_BOUND)
        want = inp["md5"]["fo-p"]
        ctx.data["probe"] = "ok" if out.strip() == str(len(want)) else out.strip()
        drop_caches()
        ctx.data["files"] = len(want)
        ctx.data["files_ok"] = _compare("/mnt/fo-p", want)
        (done,) = wait_for(lambda: [e for e in events("prefilled", successor)
                                    if e.get("blob") == bootstrap], "the successor's prefill",
                           120, every=0.5)[:1]
        ctx.data["bootstrap_reopened"] = any(e.get("key") == "fo-p"
                                             for e in events("opened", successor))
    finally:
        trace = tracer.stop()
        _no_holds()
    resent, _ = _pending_resent(trace, [kill])
    ctx.data.update(
        killed_wrote=sum(e["wrote"] for e in holding), successor_wrote=done["bytes"],
        successor_outcome=done["outcome"], taken=len(kill["inflight"]), resent=resent)
    # A new object's cache file is linked into cache/ when the kernel lets go of it.
    assert umount("/mnt/fo-p") == 0
    ctx.data["cache_file_data"], ctx.data["cache_file_wrong"] = _cache_file_vs_store(
        "erofs,pf", "fo-p", bootstrap)


def _cache_file_vs_store(volume: str, key: str, blob_id: str) -> tuple[int, list[list[int]]]:
    """(bytes of data in the object's cache file, its data ranges that differ from the blob)."""
    from ondemand_d import cachedir
    from ondemand_d.store.local import LocalStore

    def linked() -> list[cachedir.CacheFile]:
        return [f for f in cachedir.cache_files(CACHE) if f.volume == volume and f.key == key]
    try:
        (found,) = wait_for(linked, f"the cache file of {key}", 30, every=0.5)
    except AssertionError:
        raise AssertionError(f"no cache file of {volume}/{key}; there are: "
                             f"{[(f.volume, f.key) for f in cachedir.cache_files(CACHE)]}"
                             ) from None
    store = LocalStore(STORE)
    blob = b"".join(store.read_chunk(c) for c in store.get_blob(blob_id).chunks)
    fd = os.open(found.path, os.O_RDONLY)
    try:
        ranges = cachedir.data_ranges(fd)
        wrong = [[s, e] for s, e in ranges
                 if os.pread(fd, e - s, s) != blob[s:e].ljust(e - s, b"\0")]
    finally:
        os.close(fd)
    return sum(e - s for s, e in ranges), wrong


@guard(600)
def check_kill_mid_registry_fetch(ctx: Any) -> None:
    """fo-r is added through a proxy; its first blob GET after the mount stalls halfway
    (headers and half the body, then nothing): the READ waits on the fetch, the instance is
    killed, and the successor fetches again for the READ the kernel re-sends."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from registry._proxy import Fault, FaultProxy  # the registry tests' fault proxy

    inp = _state["inp"]
    registry = start_registry(ctx.out.parent / "inputs" / "guest-registry.yml",
                              ctx.out / "registry.log", GUEST_REGISTRY)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    proxy = asyncio.run_coroutine_threadsafe(FaultProxy(GUEST_REGISTRY).start(), loop).result(30)
    tracer = None
    try:
        add = subprocess.run([*ondemand_d_argv(), "--store", str(STORE), "add",
                              f"{proxy.host}/{REGISTRY_REPO}", "--name", "fo-r"],
                             capture_output=True, text=True, check=False)
        assert add.returncode == 0, f"add: {add.stdout}{add.stderr}"
        pid = main_pid()
        _mount("fo-r", "fo-r", "rg")
        proxy.add(Fault("stall", seconds=600))
        tracer = Tracer("odg-midfetch").start()
        probe = "/mnt/fo-r/bin/r3"
        child = subprocess.Popen([sys.executable, "-c", _MD5, probe], stdout=subprocess.PIPE,
                                 text=True)

        def waiting() -> list[dict[str, Any]]:
            stalled = any(f.kind == "stall" and f.times == 0 for f in proxy.faults)
            rows = _inflight_rows()
            return [r for r in rows if r["waits_on"] == "fetch"] if stalled else []
        rows = wait_for(waiting, "a READ waiting on the stalled fetch", 120, every=0.1)
        # What an operator sees of it (the registry's read_timeout is 30 s: time enough).
        shown = subprocess.run([*ondemand_d_argv(), "inflight"], capture_output=True,
                               text=True, check=False, timeout=60)
        (ctx.out / "inflight.txt").write_text(shown.stdout + shown.stderr)
        ctx.data["inflight_cli"] = shown.stdout.splitlines()
        kill = _kill_now(pid, [r["msg_id"] for r in rows])
        successor = wait_ready(pid, timeout=RESTART_BOUND)
        out, _ = child.communicate(timeout=READ_BOUND)
        want = inp["md5"]["fo-r"]
        ctx.data["probe"] = "ok" if out.strip() == want["bin/r3"] else out.strip()
        drop_caches()
        ctx.data["files"] = len(want)
        ctx.data["files_ok"] = _compare("/mnt/fo-r", want)
        ctx.data["successor_remote_reads"] = sum(
            1 for e in events("read_completed", successor) if e.get("source") == "remote")
    finally:
        trace = tracer.stop() if tracer is not None else []
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        registry.terminate()
        registry.wait(10)
    resent, _ = _pending_resent(trace, [kill])
    fsck = subprocess.run([*ondemand_d_argv(), "--store", str(STORE), "fsck"],
                          capture_output=True, text=True, check=False)
    ctx.data.update(taken=len(kill["inflight"]), taken_ids=kill["inflight"], resent=resent,
                    waits_on=[r["waits_on"] for r in rows], fsck_rc=fsck.returncode,
                    fsck=fsck.stdout.strip() or fsck.stderr.strip())


def _inflight_rows() -> list[dict[str, Any]]:
    try:
        return list(control().get("/inflight")["reads"])
    except Exception:  # noqa: BLE001 - the socket is not up yet: nothing taken
        return []


def teardown() -> None:
    save_journal()
    systemctl("stop", "ondemand-d", check=False)
    for name in (*IMAGES, "fo-p", "fo-r"):
        umount(f"/mnt/{name}")
