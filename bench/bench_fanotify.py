# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end: a cold full read against the floor and against `cat` (issue 12).

For two images, a tree of small files and one large file, built into a local store
and served by a real `ondemand-d serve` on this machine's kernel (root, 6.14+):

* cold:  mount in a fresh domain (blob files empty) and read every file once; each
         pre-content event fetches whole chunks from the store, verifies their sha256
         and writes them before the reader goes on;
* floor: the same mount again, its page cache dropped, blob files now filled: every
         event is answered at once (the least the front end can cost);
* cat:   `cat` of the uncompressed data blob file (warm), no EROFS, no events.

The store's chunks and the blob files stay in the page cache throughout, so the
numbers compare the daemon's work, not the disk. One run each; ratios against the
floor of the same run.

    .venv/bin/python bench/bench_fanotify.py [--dir /var/tmp] [--small 3000] [--large-mib 128]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ondemand_d.control.client import ControlClient  # noqa: E402

MiB = 1 << 20


def make_trees(root: Path, small: int, large_mib: int) -> dict[str, Path]:
    rng = random.Random(12)
    tree = root / "small"
    for i in range(small):
        path = tree / f"d{i % 50}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randrange(512, 16384)))
    big = root / "large"
    big.mkdir()
    with (big / "file").open("wb") as f:
        for _ in range(large_mib):
            f.write(rng.randbytes(MiB))
    return {"small": tree, "large": big}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path]) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while chunk := f.read(MiB):
                total += len(chunk)
    return time.perf_counter() - start, total


def cat(path: Path) -> float:
    with path.open("rb") as f:  # warm it first
        while f.read(8 * MiB):
            pass
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="work directory (not tmpfs)")
    ap.add_argument("--small", type=int, default=3000, help="files in the small-file tree")
    ap.add_argument("--large-mib", type=int, default=128, help="size of the large file")
    ap.add_argument("--chunk-size", default="1M", help="build --chunk-size")
    ap.add_argument("--readahead", default="4M", help="serve --readahead")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (and its log)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fanotify-", dir=args.dir))
    py = [sys.executable, "-m", "ondemand_d"]
    daemon = None
    mounts: list[Path] = []
    try:
        trees = make_trees(work / "src", args.small, args.large_mib)
        store = work / "store"
        for name, src in trees.items():
            subprocess.run([*py, "--store", str(store), "build", str(src), "--name", name,
                            "--chunk-size", args.chunk_size], check=True,
                           stdout=subprocess.DEVNULL)
        os.sync()  # no writeback of the fresh store during the runs
        sock = work / "control.sock"
        log = (work / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [*py, "--store", str(store), "serve", "--cache-dir", str(work / "cache"),
             "--control-socket", str(sock), "--log-format", "json", "--log-level", "info",
             "--readahead", args.readahead],
            stdout=log, stderr=subprocess.STDOUT)
        client = ControlClient(sock)
        for _ in range(600):
            try:
                client.get("/fanotify")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        rows = []
        for name, src in trees.items():
            mnt = work / f"mnt-{name}"
            mnt.mkdir()
            done = client.post("/fanotify/mount", {"image": name, "mountpoint": str(mnt),
                                                   "domain": f"cold-{name}"})
            mounts.append(mnt)
            paths = files_under(mnt)
            os.sync()  # the bootstrap just written
            drop_cache(paths)
            cold, size = read_all(paths)
            drop_cache(paths)
            floor, size2 = read_all(paths)
            assert size == size2
            data = [Path(b["path"]) for b in done["blobs"] if b["role"] == "data"]
            raw = sum(cat(p) for p in data)
            rows.append((name, len(paths), size, cold, floor, raw))
        print(f"readahead {args.readahead}, chunk size {args.chunk_size}")
        print(f"{'image':6} {'files':>6} {'MiB':>7} {'cold s':>8} {'floor s':>8} {'cat s':>7} "
              f"{'cold MB/s':>9} {'cold/floor':>10} {'cold/cat':>9}")
        for name, n, size, cold, floor, raw in rows:
            print(f"{name:6} {n:>6} {size / MiB:>7.1f} {cold:>8.3f} {floor:>8.3f} {raw:>7.3f} "
                  f"{size / cold / 1e6:>9.0f} {cold / floor:>10.2f} {cold / raw:>9.1f}")
        print(json.dumps({r[0]: {"cold_s": r[3], "floor_s": r[4], "cat_s": r[5]} for r in rows}))
    finally:
        if daemon is not None:  # a clean stop unmounts
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        for mnt in mounts:
            if mnt.is_mount():
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
