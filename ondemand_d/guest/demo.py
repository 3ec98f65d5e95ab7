# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d demo`: the whole flow, end to end, on a real kernel.

On the host it builds two images from a real directory tree (parts of this
Python's standard library; the second adds a directory to the first, so the
two share a data blob). Then, on this machine if its kernel has on-demand
cachefiles, else in the project's QEMU guest, it starts `ondemand-d serve`,
mounts both images by fsid in one share domain, reads every file, checks the
bytes against the source, and prints the request flow from the daemon's log.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ondemand_d.guest.runner import ondemand_d_argv
from ondemand_d.store.local import LocalStore

DOMAIN = "demo"
ID_WIDTH = 12  # blob ids are printed at this width everywhere (as `build` prints them)
IMAGES = ("demo-a", "demo-b")
# Stdlib packages copied into the sample trees: real files of many sizes.
TREE_A = ("email", "json", "http", "logging", "xml")
TREE_B_EXTRA = ("asyncio",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, help="keep the demo's files here "
                        "(default: a new directory under /var/tmp)")
    parser.add_argument("--guest", action="store_true",
                        help="use the QEMU guest even if this kernel has /dev/cachefiles")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds before the guest is stopped (default 900)")


def _say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ondemand_d_argv(), *args], text=True, check=True,
                          capture_output=True, **kw)


def prepare(work: Path) -> None:
    """Copy the sample trees and build both images into work/store."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for image, parts in (("demo-a", TREE_A), ("demo-b", TREE_A + TREE_B_EXTRA)):
        src = work / "src" / image
        if not src.exists():
            for part in parts:
                shutil.copytree(stdlib / part, src / part,
                                ignore=shutil.ignore_patterns("__pycache__"))
        _say(f"building {image} from {src}")
        out = _cli("--store", str(work / "store"), "build", str(src), "--name", image,
                   "--replace", "--json")
        report = json.loads(out.stdout)
        _say(f"  {report.get('files')} files; extents {report.get('chunks_new')} new, "
             f"{report.get('chunks_reused')} reused; data blobs {_ids(report.get('blobs', []))}")


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def inside(work: Path, cache_dir: Path) -> int:
    """Serve, mount, read, verify, report (needs root and /dev/cachefiles)."""
    log_path = work / "daemon.log"
    started = time.monotonic()
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [*ondemand_d_argv(), "--store", str(work / "store"), "serve",
             "--cache-dir", str(cache_dir), "--log-format", "json", "--tag", "demo"],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_ready(log_path, daemon)
        checked = files = 0
        for image in IMAGES:
            mnt = Path(f"/mnt/{image}")
            mnt.mkdir(parents=True, exist_ok=True)
            # nosuid,nodev: what an image brings (setuid files, device nodes) confers nothing.
            subprocess.run(["mount", "-t", "erofs", "none", "-o",
                            f"nosuid,nodev,fsid={image},domain_id={DOMAIN}", str(mnt)],
                           check=True)
        for image in IMAGES:
            want = _digests(work / "src" / image)
            got = _digests(Path(f"/mnt/{image}"))
            files += len(want)
            checked += sum(1 for k, v in want.items() if got.get(k) == v)
            if got != want:
                bad = sorted(k for k in want if got.get(k) != want[k])[:5]
                print(f"MISMATCH in {image}: {bad}")
        for image in IMAGES:
            subprocess.run(["umount", f"/mnt/{image}"], check=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    elapsed = time.monotonic() - started
    report(log_path, work / "store", files, checked, elapsed)
    return 0 if checked == files and daemon.returncode == 0 else 1


def _wait_ready(log_path: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"ondemand-d serve exited with {daemon.returncode}:\n"
                             + log_path.read_text())
        if '"event": "ready"' in log_path.read_text():
            return
        time.sleep(0.2)
    raise SystemExit("ondemand-d serve did not become ready in 120 s")


def _short(key: str) -> str:
    """A blob id at the width every id is printed at; image names as they are."""
    return key[:ID_WIDTH] if len(key) == 64 else key  # noqa: PLR2004 - a sha256 hex id


def _ids(blob_ids: list[str]) -> str:
    return ", ".join(_short(b) for b in blob_ids) or "none"


def report(log_path: Path, store_root: Path, files: int, checked: int, elapsed: float) -> None:
    """Print the request flow and a summary from the daemon's JSON log."""
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    reqs = [e for e in lines if e.get("op") in ("OPEN", "READ", "CLOSE")]
    print("\nRequest flow (from the daemon's log; first 30 requests):")
    print(f"{'op':5} {'msg':>5} {'obj':>4} {'key/blob':{ID_WIDTH}} {'off':>10} {'len':>8} "
          f"{'chunks':>6} {'source':7} {'ms':>7} outcome")
    for e in reqs[:30]:
        what = _short(e.get("key") or e.get("blob") or "")  # key: fsid, tag or device=
        print(f"{e['op']:5} {e.get('msg_id', ''):>5} {e.get('object_id', ''):>4} "
              f"{what:{ID_WIDTH}} "
              f"{e.get('off', ''):>10} {e.get('len', ''):>8} {e.get('chunks', ''):>6} "
              f"{e.get('source', ''):7} {e.get('duration_ms', ''):>7} {e.get('outcome', '')}")
    ops = Counter(e["op"] for e in reqs)
    opened = Counter(_short(e.get("key") or "") for e in reqs if e["op"] == "OPEN")
    read_bytes = sum(e.get("bytes", 0) for e in reqs if e["op"] == "READ")
    prefilled = sum(e.get("bytes", 0) for e in lines if e.get("event") == "prefilled")
    ahead = sum(e.get("bytes", 0) for e in lines if e.get("event") == "read_ahead")
    failed = sum(1 for e in reqs if e.get("outcome") not in (None, "ok"))
    print("\nSummary:")
    print(f"  OPENs  {ops['OPEN']:>6}  ({', '.join(f'{k} x{n}' for k, n in opened.items())})")
    for blob_id, names in _shared_blobs(store_root).items():
        times = opened.get(_short(blob_id), 0)
        print(f"  shared data blob {_short(blob_id)}: used by {' and '.join(names)}, "
              f"OPENed {({1: 'once', 2: 'twice'}).get(times, f'{times} times')}, cached once")
    print(f"  READs  {ops['READ']:>6}  ({read_bytes} bytes written for them; {prefilled} bytes "
          f"of bootstrap prefilled; {ahead} bytes read ahead)")
    print(f"  CLOSEs {ops['CLOSE']:>6}")
    print(f"  failed requests: {failed}")
    print(f"  files read and compared with the source: {checked}/{files} identical")
    print(f"  time from daemon start to stop: {elapsed:.1f} s")
    print(f"  full log: {log_path}")


def _shared_blobs(store_root: Path) -> dict[str, list[str]]:
    """Data blobs that more than one image uses -> the names of those images."""
    users: dict[str, list[str]] = {}
    for image in LocalStore(store_root, create=False).images():
        for _key, blob_id in image.devices:
            users.setdefault(blob_id, []).append(image.name)
    return {b: names for b, names in users.items() if len(names) > 1}


def run(args: argparse.Namespace, ctx: Any) -> int:
    """The `demo` subcommand."""
    if args.inside:
        return inside(args.workdir, Path(os.environ.get("ODG_CACHE", "/mnt/cache")) / "fscache")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="ondemand-d-demo-", dir="/var/tmp")))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    native = Path("/dev/cachefiles").exists() and os.geteuid() == 0 and not args.guest
    from ondemand_d.fanotify import demo as fanotify_demo  # noqa: PLC0415

    where = "here" if native else "in the guest"
    if native:
        _say("this kernel has /dev/cachefiles: running here")
        rc = inside(work, work / "cache")
    elif not args.guest and os.geteuid() == 0 and fanotify_demo.available(work):
        _say("no /dev/cachefiles, but this kernel has fanotify pre-content events: running "
             "here through the fanotify front end (no guest)")
        rc = fanotify_demo.run_native(work, IMAGES)
        where = "here through the fanotify front end"
    else:
        from ondemand_d.guest.kernel import cached_kernel  # noqa: PLC0415
        from ondemand_d.guest.runner import run_in_guest  # noqa: PLC0415

        cached = cached_kernel()
        _say("no on-demand cachefiles in this kernel: booting the project's QEMU guest "
             + (f"(kernel {cached})" if cached else
                "(its kernel is built first, once per machine: 8 to 17 minutes on 2 cores)"))
        result = run_in_guest(
            [*ondemand_d_argv(), "demo", "--inside", "--workdir", str(work)],
            timeout=args.timeout, results_dir=work, env={"PYTHONPATH": _package_root()})
        print(result.stdout, end="")
        if result.returncode != 0:
            print(result.summary(), file=sys.stderr)
        rc = 0 if result.returncode == 0 else 1
    verdict = "passed" if rc == 0 else "FAILED"
    print(f"\ndemo {verdict}: built 2 images into {work / 'store'}, served them "
          f"{where}, logs in {work}")
    return rc


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])
