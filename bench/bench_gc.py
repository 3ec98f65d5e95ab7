# SPDX-License-Identifier: Apache-2.0
"""gc time and memory for a store of 100 images (issue 10, section 4).

Builds N images (a shared base plus each image's own files), removes half of
them, then runs in a fresh child process each: the baseline (open the store,
walk and stat every file: the least any gc must do), `gc --dry-run`, `gc`,
and `fsck` (which also hashes every chunk). Prints seconds and the child's
peak RSS, as ratios against the baseline of the same run.

    .venv/bin/python bench/bench_gc.py [--images 100] [--dir /var/tmp]
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ondemand_d.image.build import build_image  # noqa: E402
from ondemand_d.image.tree import Node, directory, regular  # noqa: E402
from ondemand_d.store.fsck import fsck  # noqa: E402
from ondemand_d.store.gc import gc, rm  # noqa: E402
from ondemand_d.store.local import LocalStore  # noqa: E402

MiB = 1 << 20


def _tree(i: int, base: dict[bytes, bytes]) -> Node:
    root = directory(mtime_ns=10**18)
    for name, data in base.items():
        root.children[name] = regular(data, mtime_ns=10**18)
    rng = random.Random(i)
    for k in range(8):
        root.children[b"own%d" % k] = regular(rng.randbytes(40_000 + 1000 * k), mtime_ns=10**18)
    root.children[b"big"] = regular(rng.randbytes(MiB + 123), mtime_ns=10**18)
    return root


def _child(job: Callable[[], object]) -> tuple[float, int]:
    """Run `job` in a fork; (seconds, peak RSS in KiB) of that child alone."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            job()
        finally:
            os._exit(0)
    _, status, usage = os.wait4(pid, 0)
    assert status == 0, status
    return time.perf_counter() - start, usage.ru_maxrss


def _walk(root: Path) -> None:
    LocalStore(root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.stat(os.path.join(dirpath, name))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gc-", dir=args.dir))
    try:
        rng = random.Random(0)
        base = {b"base%d" % k: rng.randbytes(300_000) for k in range(10)}
        store = LocalStore(work / "store")
        t0 = time.perf_counter()
        for i in range(args.images):
            build_image(_tree(i, base), store, f"img{i:03d}")
        built = time.perf_counter() - t0
        chunks = sum(1 for _ in (store.root / "chunks").rglob("*") if _.is_file())
        print(f"built {args.images} images in {built:.1f} s: {len(store.blob_ids())} blobs, "
              f"{chunks} chunks", file=sys.stderr)
        removed = rm(store, [f"img{i:03d}" for i in range(0, args.images, 2)])
        freed = sum(b for _, b in removed.unshared.values())
        root = store.root
        rows = [("baseline: walk + stat every file", _child(lambda: _walk(root))),
                ("gc --dry-run", _child(lambda: gc(LocalStore(root), dry_run=True))),
                ("gc", _child(lambda: gc(LocalStore(root)))),
                ("fsck (hashes every chunk)", _child(lambda: fsck(LocalStore(root))))]
        base_s, base_kib = rows[0][1]
        print(f"| store | step | seconds | x baseline | peak RSS MiB | x baseline |")
        print("|---|---|---:|---:|---:|---:|")
        for label, (secs, kib) in rows:
            print(f"| {args.images} images, {args.images // 2} removed ({freed / MiB:.0f} MiB "
                  f"unshared) | {label} | {secs:.3f} | {secs / base_s:.1f} | "
                  f"{kib / 1024:.1f} | {kib / base_kib:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
