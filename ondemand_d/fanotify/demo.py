# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d demo` natively through the fanotify front end (no guest, no kernel build).

Used when this kernel has pre-content events and no /dev/cachefiles: start `serve`,
mount the two demo images in one domain through the control socket, read and check
every file, unmount, stop, and print the event flow from the daemon's log.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ondemand_d.control.client import ControlClient, ControlUnavailable
from ondemand_d.fanotify.probe import probe
from ondemand_d.guest.runner import ondemand_d_argv
from ondemand_d.store.local import LocalStore

DOMAIN = "demo"
ID_WIDTH = 12


def available(work: Path) -> bool:
    """Whether the fanotify front end works here (root, 6.14+, a disk that takes marks)."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        return probe(Path(tmp)).available


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def run_native(work: Path, images: tuple[str, ...]) -> int:
    """Serve, mount through the daemon, read, verify, report; 0 when every file matched."""
    log_path = work / "daemon.log"
    sock = work / "control.sock"
    started = time.monotonic()
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [*ondemand_d_argv(), "--store", str(work / "store"), "serve", "--cache-dir",
             str(work / "cache"), "--control-socket", str(sock), "--log-format", "json"],
            stdout=log_file, stderr=subprocess.STDOUT)
    files = checked = 0
    try:
        client = ControlClient(sock)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.get("/fanotify")
                break
            except ControlUnavailable:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("ondemand-d serve did not start:\n"
                                     + log_path.read_text()) from None
                time.sleep(0.2)
        mounts = []
        for image in images:
            mnt = work / f"mnt-{image}"
            mnt.mkdir(exist_ok=True)
            client.post("/fanotify/mount", {"image": image, "mountpoint": str(mnt),
                                            "domain": DOMAIN})
            mounts.append(mnt)
        for image, mnt in zip(images, mounts, strict=True):
            want, got = _digests(work / "src" / image), _digests(mnt)
            files += len(want)
            checked += sum(1 for k, v in want.items() if got.get(k) == v)
            if got != want:
                bad = sorted(k for k in want if got.get(k) != want[k])[:5]
                print(f"MISMATCH in {image}: {bad}")
        for mnt in mounts:
            client.post("/fanotify/umount", {"mountpoint": str(mnt)})
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    report(log_path, work / "store", files, checked, time.monotonic() - started)
    return 0 if checked == files and daemon.returncode == 0 else 1


def report(log_path: Path, store_root: Path, files: int, checked: int, elapsed: float) -> None:
    """The event flow and a summary from the daemon's JSON log."""
    lines: list[dict[str, Any]] = [json.loads(x) for x in log_path.read_text().splitlines()
                                   if x.startswith("{")]
    events = [e for e in lines if e.get("event") == "read_completed"]
    print("\nEvent flow (FAN_PRE_ACCESS, from the daemon's log; first 30):")
    print(f"{'event':>5} {'blob':{ID_WIDTH}} {'off':>10} {'len':>8} {'chunks':>6} {'source':7} "
          f"{'ms':>7} outcome")
    for e in events[:30]:
        print(f"{e['msg_id']:>5} {(e.get('blob') or '')[:ID_WIDTH]:{ID_WIDTH}} {e['off']:>10} "
              f"{e['len']:>8} {e['chunks']:>6} {e.get('source', ''):7} {e['duration_ms']:>7} "
              f"{e['outcome']}")
    filled: Counter[str] = Counter()
    for e in lines:
        if e.get("event") in ("read_completed", "read_ahead") and e.get("blob"):
            filled[e["blob"]] += e.get("bytes", 0)
    store = LocalStore(store_root, create=False)
    users: dict[str, list[str]] = {}
    for image in store.images():
        for _key, blob_id in image.devices:
            users.setdefault(blob_id, []).append(image.name)
    print("\nSummary:")
    print(f"  events {len(events)}, answered with EIO: "
          f"{sum(1 for e in events if e['outcome'] != 'ok')}")
    for blob_id, names in users.items():
        size = store.get_blob(blob_id).size
        once = "each chunk once" if filled[blob_id] <= size else "SOME CHUNKS MORE THAN ONCE"
        print(f"  data blob {blob_id[:ID_WIDTH]} (used by {' and '.join(names)}): one file, "
              f"{filled[blob_id]} of {size} bytes filled, {once}")
    print(f"  files read and compared with the source: {checked}/{files} identical")
    print(f"  time from daemon start to stop: {elapsed:.1f} s")
    print(f"  full log: {log_path}")
