# SPDX-License-Identifier: Apache-2.0
"""Benchmark: what a real start-up fetches from a registry, per chunk size (not part of the suite).

    PYTHONPATH=. python3 bench/bench_startup.py [--tree DIR] [--chunk-sizes 1M,64K,4K]

The start-up is Python importing a typical application's modules (asyncio,
json, logging, http.client, email, ssl, sqlite3, ...) from a copy of its own
standard library (without site-packages). A child interpreter with an audit
hook records every file it opens in that tree (.pyc files, read whole) and the
extension modules it loads: those bytes are what the start-up reads.

For each chunk size the tree is built with `ondemand-d build --chunk-size`,
pushed to a local docker-registry (zstd per store chunk) and added to an empty
store. Then, host side, through `RegistrySource` (Range GETs, zstd, sha256):
`add` has already downloaded the bootstrap and chunk tables; then, one file
at a time like a cold start's demand READs, the store chunks under each file's
data. The second column set models the daemon's readahead too (after each
READ, the store chunks in the next 4 MiB of the blob). No kernel here: the
kernel's own readahead can only ask for more of the same files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import structlog  # noqa: E402
from _registry import start_registry  # noqa: E402

from ondemand_d.image import format as f  # noqa: E402
from ondemand_d.image.build import BuildOptions, build_image  # noqa: E402
from ondemand_d.image.command import parse_size  # noqa: E402
from ondemand_d.image.reader import ImageReader  # noqa: E402
from ondemand_d.image.source_dir import read_directory  # noqa: E402
from ondemand_d.registry import reference  # noqa: E402
from ondemand_d.registry.add import add  # noqa: E402
from ondemand_d.registry.client import RegistryClient  # noqa: E402
from ondemand_d.registry.config import RegistryConfig  # noqa: E402
from ondemand_d.registry.push import push  # noqa: E402
from ondemand_d.registry.source import RegistrySource  # noqa: E402
from ondemand_d.store.local import LocalStore  # noqa: E402
from ondemand_d.store.model import Blob, Chunk  # noqa: E402

MB = 1e6
READAHEAD = 4 << 20  # the daemon's default
MODULES = [
    "asyncio", "json", "logging", "logging.handlers", "argparse", "http.client",
    "urllib.request", "email.message", "email.parser", "ssl", "decimal", "datetime",
    "pathlib", "subprocess", "typing", "dataclasses", "sqlite3", "xml.etree.ElementTree",
    "zipfile", "tarfile", "concurrent.futures", "uuid", "hashlib", "base64", "csv",
    "shutil", "tempfile", "inspect", "contextvars", "statistics", "unittest",
]
_PROBE = """
import importlib, json, sys
root = sys.argv[1]
opened = set()
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(root + "/"):
        opened.add(args[0])
sys.addaudithook(hook)
sys.path[:0] = [root, root + "/lib-dynload"]
for name in sys.argv[2:]:
    importlib.import_module(name)
for mod in list(sys.modules.values()):
    path = getattr(mod, "__file__", None) or ""
    if path.startswith(root + "/") and path.endswith(".so"):
        opened.add(path)  # mapped by the loader, not open()ed through Python
print(json.dumps(sorted(opened)))
"""


def startup_files(tree: Path) -> list[str]:
    """Paths (relative to `tree`) a Python start-up reads, in sorted order."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PROBE, str(tree), *MODULES],
        capture_output=True, text=True, check=True,
    ).stdout
    return [str(Path(p).relative_to(tree)) for p in json.loads(out)]


@dataclass
class Row:
    label: str
    store_chunk: int = 0
    layer: int = 0
    bootstrap_wire: int = 0
    read: int = 0
    needed: int = 0
    wire: int = 0
    requests: int = 0
    seconds: float = 0.0
    ra_needed: int = 0
    ra_wire: int = 0
    ra_requests: int = 0


def file_ranges(reader: ImageReader, path: str) -> list[tuple[int, int, int]]:
    """(device_id, blob offset, length) of a file's data; [] if it lives in the bootstrap."""
    ino = reader.lookup(path.encode())
    if ino.header.datalayout != f.LAYOUT_CHUNK_BASED:
        return []
    bits, entries = reader.chunk_map(ino)
    size = 1 << bits
    out = []
    for k, (device_id, blkaddr) in enumerate(entries):
        if blkaddr != f.NULL_ADDR:
            length = f.align(min(size, ino.size - k * size), f.BLOCK)
            out.append((device_id, blkaddr * f.BLOCK, length))
    return out


async def replay(
    source: RegistrySource, blobs: list[Blob], reads: list[list[tuple[int, int, int]]],
    readahead: int,
) -> tuple[int, int]:
    """Fetch each READ's store chunks (and `readahead` bytes past it); (chunk bytes, requests)."""
    have: set[tuple[str, int]] = set()
    needed = 0
    start_requests = source.client.requests
    for ranges in reads:
        for device_id, off, length in ranges:
            blob = blobs[device_id - 1]
            want = list(blob.chunks_for(off, length))
            if readahead and want:
                want += blob.chunks_for(want[-1].end, readahead)
            missing: dict[int, Chunk] = {}
            for c in want:
                if (blob.blob_id, c.offset) not in have:
                    missing[c.offset] = c
                    have.add((blob.blob_id, c.offset))
            if missing:
                await source.fetch(blob, list(missing.values()))
                needed += sum(c.length for c in missing.values())
    return needed, source.client.requests - start_requests


async def run_case(host: str, tmp: Path, tree: Path, files: list[str], base: int) -> Row:
    label = f"{base // 1024} KiB" if base < 1 << 20 else f"{base >> 20} MiB"
    src, dst = LocalStore(tmp / f"src-{base}"), LocalStore(tmp / f"dst-{base}")
    build_image(read_directory(tree), src, "stdlib", BuildOptions(base_chunk=base))
    ref = reference.parse(f"{host}/bench/stdlib-{base // 1024}k:v1")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "stdlib", ref, client)
        added = await add(dst, ref, client, name="stdlib")
    image = dst.get_image("stdlib")
    boot = dst.get_blob(image.bootstrap)
    blobs = [dst.get_blob(b) for _, b in image.devices]
    row = Row(label, store_chunk=blobs[0].chunks[0].length)
    row.layer = sum(c.remote.length for b in blobs for c in b.chunks if c.remote)

    source = RegistrySource(RegistryConfig())
    row.bootstrap_wire = added.bytes_downloaded  # `add` keeps the bootstrap (and tables)
    primary = b"".join(dst.read_chunk(c) for c in boot.chunks)
    reader = ImageReader(primary, [lambda _o, _n: b""] * len(blobs))  # chunk maps only
    reads = [file_ranges(reader, p) for p in files]
    row.read = sum(reader.lookup(p.encode()).size for p in files)
    start = time.perf_counter()
    row.needed, row.requests = await replay(source, blobs, reads, 0)
    row.seconds = time.perf_counter() - start
    row.wire = source.bytes_fetched
    await source.aclose()

    source = RegistrySource(RegistryConfig())
    row.ra_needed, row.ra_requests = await replay(source, blobs, reads, READAHEAD)
    row.ra_wire = source.bytes_fetched
    await source.aclose()
    return row


async def main_async(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        tmp = Path(d)
        tree = tmp / "tree"
        shutil.copytree(args.tree, tree, symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages"))
        files = startup_files(tree)
        proc, host = start_registry(tmp)
        try:
            rows = []
            for base in args.chunk_sizes:
                rows.append(await run_case(host, tmp, tree, files, base))
                print(f"measured --chunk-size {rows[-1].label}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"start-up: Python importing {len(MODULES)} modules from {args.tree} "
          f"(without site-packages): {len(files)} files, {rows[0].read / MB:.2f} MB read")
    print()
    print("| chunk size | store chunk | data layer (zstd) | add downloads | bytes read "
          "| chunk bytes fetched | on the wire | share of layer | Range GETs | time "
          "| with 4 MiB readahead: chunk bytes | on the wire | Range GETs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.label} | {r.store_chunk // 1024} KiB | {r.layer / MB:.1f} MB "
              f"| {r.bootstrap_wire / MB:.2f} MB | {r.read / MB:.2f} MB "
              f"| {r.needed / MB:.2f} MB ({r.needed / r.read:.1f}x) | {r.wire / MB:.2f} MB "
              f"| {100 * r.wire / r.layer:.1f}% | {r.requests} | {r.seconds:.2f} s "
              f"| {r.ra_needed / MB:.2f} MB ({r.ra_needed / r.read:.1f}x) "
              f"| {r.ra_wire / MB:.2f} MB | {r.ra_requests} |")


def main() -> None:
    default_tree = Path(sysconfig.get_paths()["stdlib"])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", type=Path, default=default_tree, help=f"default {default_tree}")
    p.add_argument("--chunk-sizes", default="1M,64K,4K",
                   type=lambda s: [parse_size(x) for x in s.split(",")])
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
