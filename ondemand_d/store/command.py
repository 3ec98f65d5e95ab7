# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d rm`, `ondemand-d gc` and `ondemand-d fsck`: the store's upkeep commands."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ondemand_d.errors import EXIT_FAILED, EXIT_OK, StoreError
from ondemand_d.store.fsck import fsck
from ondemand_d.store.gc import gc, rm

if TYPE_CHECKING:
    from ondemand_d.cli import Context


def show_size(n: int) -> str:
    """1234567 -> '1234567 bytes (1.2 MiB)'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def add_rm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image name(s) to remove")


def run_rm(args: argparse.Namespace, ctx: Context) -> int:
    store = ctx.store()
    missing = [n for n in args.images if not store.has_image(n)]
    if missing:
        msg = f"no image named {missing[0]!r} in {store.root} (see 'ondemand-d ls'); nothing removed"
        raise StoreError(msg)
    report = rm(store, list(args.images))
    for name in report.removed:
        chunks, size = report.unshared[name]
        print(f"removed {name}: {chunks} chunk(s), {show_size(size)} used by no other image")
    total = sum(b for _, b in report.unshared.values())
    print(f"removed {len(report.removed)} image(s); 'ondemand-d gc' frees {show_size(total)}")
    return EXIT_OK


def add_gc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="say what would be freed, free nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--cache-dir", type=Path, default=argparse.SUPPRESS,
                        help="the daemon's cache directory, whose fanotify blob files of "
                        "removed blobs go too (default: the configured cache_dir)")


def run_gc(args: argparse.Namespace, ctx: Context) -> int:
    store = ctx.store()
    report = gc(store, dry_run=args.dry_run, cache_dir=ctx.cfg.cache_dir, progress=_progress)
    if args.json:
        print(json.dumps(vars(report)))
        return EXIT_OK
    verb = "would free" if args.dry_run else "freed"
    leases = (f"; kept {report.kept_for_leases} blob(s) a running daemon has open"
              if report.kept_for_leases else "")
    print(f"gc {verb} {report.blobs} blob(s), {report.locations} location record(s) and "
          f"{report.chunks} chunk(s), {show_size(report.bytes)}, in {store.root} "
          f"({report.images} image(s) kept{leases})")
    if report.cache_files:
        print(f"gc {verb} {report.cache_files} fanotify cache file(s), "
              f"{show_size(report.cache_bytes)}, in {ctx.cfg.cache_dir}")
    return EXIT_OK


def add_fsck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repair", action="store_true",
                        help="quarantine damaged files (rewritten when their content arrives "
                        "again) and drop stale key entries")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run_fsck(args: argparse.Namespace, ctx: Context) -> int:
    store = ctx.store()
    report = fsck(store, repair=args.repair, progress=_progress)
    if args.json:
        print(json.dumps({"images": report.images, "blobs": report.blobs,
                          "chunks": report.chunks, "bytes": report.bytes,
                          "affected": report.affected,
                          "problems": [dataclasses.asdict(p) for p in report.problems]}))
    else:
        for p in report.problems:
            whom = f" (affects {', '.join(p.images)})" if p.images else ""
            done = f"; {p.repaired}" if p.repaired else ""
            print(f"{p.kind}: {p.path}: {p.detail}{whom}{done}")
        state = "clean" if not report.problems else f"{len(report.problems)} problem(s)"
        affected = f", images affected: {', '.join(report.affected)}" if report.affected else ""
        print(f"fsck checked {report.images} image(s), {report.blobs} blob(s), "
              f"{report.chunks} chunk(s) ({show_size(report.bytes)}) in {store.root}: "
              f"{state}{affected}")
    unrepaired = [p for p in report.problems if not p.repaired]
    return EXIT_FAILED if unrepaired else EXIT_OK
