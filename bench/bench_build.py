# SPDX-License-Identifier: Apache-2.0
"""Image build speed against mkfs.erofs, and dedup between two versions of a tree.

    PYTHONPATH=. python3 bench/bench_build.py [--tree DIR] [--keep-site-packages] [--repeat N]
        [--chunk-sizes 64K,4K]

The tree (default: this Python's standard library, without site-packages) is
copied once to a temporary directory, so both builders read the same files
from a warm page cache. Then:

* `ondemand-d build` (into a fresh store) and `mkfs.erofs --chunksize=1048576
  --blobdev` (erofs-utils 1.5) each build it; best of --repeat runs; MB/s is
  regular-file bytes per second; ratio = our time / mkfs time. Extra rows
  build the same tree at other base chunk sizes (--chunk-sizes; store chunks
  follow them, from 64 KiB to 1 MiB).
* a second version of the tree (a few files changed, one added, one removed)
  is built into the same store; the table shows how much of it was already
  there. mkfs.erofs has no cross-image dedup, so its second blob is a full copy.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ondemand_d.image.build import BuildOptions, build_image  # noqa: E402
from ondemand_d.image.command import parse_size  # noqa: E402
from ondemand_d.image.report import BuildReport  # noqa: E402
from ondemand_d.image.source_dir import read_directory  # noqa: E402
from ondemand_d.store import LocalStore  # noqa: E402

MB = 1e6


def _copy_tree(src: Path, dst: Path, *, keep_site_packages: bool) -> None:
    ignore = None if keep_site_packages else shutil.ignore_patterns("site-packages")
    shutil.copytree(src, dst, symlinks=True, ignore=ignore)


def _make_second_version(tree: Path) -> int:
    """Change a few files in place, add one, remove one; return how many were touched."""
    files = sorted(p for p in tree.rglob("*.py") if p.is_file() and p.stat().st_size > 20000)
    changed = files[:: max(1, len(files) // 5)][:5]
    for p in changed:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] + b"# patched\n" + data[len(data) // 2 :])
    (tree / "added_module.py").write_bytes(os.urandom(300_000))
    victim = next(p for p in sorted(tree.rglob("*.py")) if p.is_file() and p not in changed)
    victim.unlink()
    return len(changed) + 2


def _ours(tree: Path, store: Path, name: str, base: int = 1 << 20) -> tuple[float, BuildReport]:
    start = time.perf_counter()
    report = build_image(read_directory(tree), LocalStore(store), name, BuildOptions(base))
    return time.perf_counter() - start, report


def _label(base: int) -> str:
    return f"{base >> 20} MiB" if base >= 1 << 20 else f"{base >> 10} KiB"


def _mkfs(tree: Path, out: Path) -> tuple[float, int, int]:
    meta, blob = out / "meta.img", out / "blob.img"
    for p in (meta, blob):
        p.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["mkfs.erofs", "--quiet", "--chunksize=1048576", f"--blobdev={blob}",
                    str(meta), str(tree)], check=True, capture_output=True)
    return time.perf_counter() - start, meta.stat().st_size, blob.stat().st_size


def main() -> int:
    default_tree = Path(sysconfig.get_paths()["stdlib"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=default_tree, help=f"default {default_tree}")
    p.add_argument("--keep-site-packages", action="store_true")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--chunk-sizes", default="64K,4K",
                   type=lambda s: [parse_size(x) for x in s.split(",")], help="extra rows: ondemand-d build at these base chunk sizes (default 64K,4K)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "tree"
        _copy_tree(args.tree, tree, keep_site_packages=args.keep_site_packages)
        ours: list[tuple[float, BuildReport]] = []
        theirs: list[tuple[float, int, int]] = []
        for i in range(args.repeat):
            ours.append(_ours(tree, tmp / f"store{i}", "v1"))
            theirs.append(_mkfs(tree, tmp))
        t_ours, r1 = min(ours, key=lambda x: x[0])
        t_mkfs, meta, blob = min(theirs, key=lambda x: x[0])
        data_mb = r1.bytes / MB

        print(f"tree: {args.tree} ({r1.files} files, {r1.inodes} inodes, {data_mb:.1f} MB of file data)")
        print()
        print("| builder | seconds | MB/s | bootstrap | data blob(s) |")
        print("|---|---:|---:|---:|---:|")
        print(f"| ondemand-d build (1 MiB base chunks) | {t_ours:.2f} | {data_mb / t_ours:.1f} "
              f"| {r1.bootstrap_bytes / MB:.2f} MB | {r1.new_blob_bytes / MB:.1f} MB |")
        for base in args.chunk_sizes:
            t, r = min((_ours(tree, tmp / f"store-{base}-{i}", "v1", base)
                        for i in range(args.repeat)), key=lambda x: x[0])
            print(f"| ondemand-d build --chunk-size {_label(base)} | {t:.2f} | "
                  f"{data_mb / t:.1f} | {r.bootstrap_bytes / MB:.2f} MB "
                  f"| {r.new_blob_bytes / MB:.1f} MB |")
        print(f"| mkfs.erofs 1.5 --chunksize=1048576 --blobdev | {t_mkfs:.2f} | "
              f"{data_mb / t_mkfs:.1f} | {meta / MB:.2f} MB | {blob / MB:.1f} MB |")
        print()
        print(f"time ratio ondemand-d / mkfs.erofs: {t_ours / t_mkfs:.2f}")

        touched = _make_second_version(tree)
        t2, r2 = _ours(tree, tmp / "store0", "v2")
        _, _, blob2 = _mkfs(tree, tmp)
        print()
        print(f"second version: {touched} files changed, added or removed")
        print()
        print("| image | file data | chunks total / new / reused | new blob | reused | dedup ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in (("v1 (empty store)", r1), ("v2 (after v1)", r2)):
            ratio = r.bytes / max(r.bytes_new, 1)
            print(f"| {name} | {r.bytes / MB:.1f} MB | {r.chunks_total} / {r.chunks_new} / "
                  f"{r.chunks_reused} | {r.new_blob_bytes / MB:.2f} MB | "
                  f"{r.bytes_saved / MB:.1f} MB | {ratio:.1f}x |")
        print(f"| v2 with mkfs.erofs (no cross-image dedup) | {r2.bytes / MB:.1f} MB | - | "
              f"{blob2 / MB:.2f} MB | 0 | 1.0x |")
        print()
        print(f"v2 built in {t2:.2f} s; dedup ratio = file data / bytes newly written.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
