# SPDX-License-Identifier: Apache-2.0
"""Benchmark: lazy pull from a local registry (not part of the pass/fail suite).

Starts Debian's docker-registry on 127.0.0.1 with a temp config and storage,
pushes a synthetic image, adds it to a fresh store, then measures:

1. cold full read: every chunk of the data blob through RegistrySource
   (Range GETs, zstd, sha256), a few windows in flight like kernel readahead,
   against downloading the same layer with one plain aiohttp GET;
2. start-up pattern: the first 4 KiB of a few hundred "files" (a synthetic
   layout of small and large files packed back to back), bytes on the wire and
   chunk bytes against the image size, for two chunk sizes.

Usage: PYTHONPATH=. python3 bench/bench_registry.py [--mib 128] [--files 300]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import structlog
import zstandard

from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource, windows
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk, Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _registry import start_registry  # noqa: E402

PAGE = 4096
READAHEAD = 4  # windows in flight during the full read
REPEAT = 3


def make_data(size: int, seed: int) -> bytes:
    """Roughly 2:1 compressible: random words from a small vocabulary, some random bytes."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)).hex().encode() for _ in range(2000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=512)) if rng.random() < 0.7 else rng.randbytes(8192)
    return bytes(out[:size])


def file_heads(size: int, count: int, seed: int) -> list[int]:
    """Offsets of the first page of `count` files picked from a packed layout."""
    rng = random.Random(seed)
    starts, pos = [], 0
    while pos < size:
        starts.append(pos)
        length = int(min(2 << 20, max(PAGE, rng.lognormvariate(9.5, 1.6))))
        pos += (length + PAGE - 1) // PAGE * PAGE
    return sorted(rng.sample(starts, min(count, len(starts))))


async def full_read(source: RegistrySource, blob: Blob, window: int) -> float:
    start = time.perf_counter()
    groups = list(windows(blob.chunks, window))
    sem = asyncio.Semaphore(READAHEAD)

    async def one(group: tuple[Chunk, ...]) -> None:
        async with sem:
            await source.fetch(blob, group)

    await asyncio.gather(*(one(g) for g in groups))
    return time.perf_counter() - start


async def plain_download(
    host: str, repo: str, layers: list[str], blob: Blob | None = None
) -> tuple[float, int]:
    """One plain GET per layer; with `blob`, also zstd -d + sha256 every chunk (one thread)."""
    start = time.perf_counter()
    total = 0
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for digest in layers:
            async with session.get(f"http://{host}/v2/{repo}/blobs/{digest}") as resp:
                body = await resp.read()
            total += len(body)
            if blob is not None:
                dctx = zstandard.ZstdDecompressor()
                for c in blob.chunks:
                    assert c.remote is not None
                    frame = body[c.remote.offset : c.remote.offset + c.remote.length]
                    data = dctx.decompress(frame, max_output_size=c.length)
                    assert hashlib.sha256(data).hexdigest() == c.digest
    return time.perf_counter() - start, total


async def run_case(
    host: str, tmp: Path, data: bytes, chunk: int, heads: list[int]
) -> dict[str, float]:
    src = LocalStore(tmp / f"src-{chunk}")
    (tmp / "boot.bin").write_bytes(make_data(64 << 10, 1))
    (tmp / "data.bin").write_bytes(data)
    boot = src.ingest_file(tmp / "boot.bin")
    blob = src.ingest_file(tmp / "data.bin", chunk_size=chunk)
    src.put_image(Image("bench", boot.blob_id, ((blob.blob_id, blob.blob_id),)), replace=True)
    ref = reference.parse(f"{host}/bench/c{chunk // 1024}k:v1")
    dst = LocalStore(tmp / f"dst-{chunk}")
    async with RegistryClient(RegistryConfig()) as client:
        await push(src, "bench", ref, client)
        added = await add(dst, ref, client)
    remote = dst.get_blob(blob.blob_id)
    layer = {c.remote.blob for c in remote.chunks if c.remote}
    wire_size = sum(c.remote.length for c in remote.chunks if c.remote)

    # Alternate the two, best of REPEAT each: both see the same warm registry.
    t_source = t_plain = t_verify = float("inf")
    for _ in range(REPEAT):
        t, plain_bytes = await plain_download(host, ref.repository, sorted(layer))
        t_plain = min(t_plain, t)
        t, _ = await plain_download(host, ref.repository, sorted(layer), remote)
        t_verify = min(t_verify, t)
        source = RegistrySource(RegistryConfig())
        t_source = min(t_source, await full_read(source, remote, 8 << 20))
        await source.aclose()

    source = RegistrySource(RegistryConfig())
    needed: dict[str, Chunk] = {}
    for off in heads:
        for c in remote.chunks_for(off, PAGE):
            needed[c.digest] = c
    have: set[str] = set()  # what the daemon's write-through would now hold
    start = time.perf_counter()
    for off in heads:  # one READ at a time, as a cold start's page faults would be
        missing = [c for c in remote.chunks_for(off, PAGE) if c.digest not in have]
        await source.fetch(remote, missing)
        have.update(c.digest for c in missing)
    t_heads = time.perf_counter() - start
    heads_wire = source.bytes_fetched
    await source.aclose()
    return {
        "chunk_kib": chunk // 1024,
        "size_mib": remote.size / (1 << 20),
        "wire_mib": wire_size / (1 << 20),
        "add_kib": added.bytes_downloaded / 1024,
        "t_source": t_source,
        "t_plain": t_plain,
        "t_verify": t_verify,
        "plain_mib": plain_bytes / (1 << 20),
        "heads": len(heads),
        "heads_wire_mib": heads_wire / (1 << 20),
        "heads_chunks_mib": sum(c.length for c in needed.values()) / (1 << 20),
        "t_heads": t_heads,
    }


async def main_async(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as d:
        tmp = Path(d)
        proc, host = start_registry(tmp)
        try:
            size = args.mib << 20
            data = make_data(size, 7)
            heads = file_heads(size, args.files, 3)
            rows = [await run_case(host, tmp, data, chunk, heads) for chunk in (64 << 10, 1 << 20)]
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"image: one {args.mib} MiB data blob (+64 KiB bootstrap), zstd per chunk, local registry;"
        f" full reads best of {REPEAT}, 8 MiB windows, {READAHEAD} in flight"
    )
    print()
    print(
        "| chunk | data MiB | layer MiB | add downloads | full read via RegistrySource "
        "| plain GET of layer | ratio | plain GET + zstd -d + sha256 | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['chunk_kib']:.0f} KiB | {r['size_mib']:.1f} | {r['wire_mib']:.1f} "
            f"| {r['add_kib']:.0f} KiB "
            f"| {r['t_source']:.2f} s ({r['size_mib'] / r['t_source']:.0f} MiB/s) "
            f"| {r['t_plain']:.2f} s ({r['plain_mib'] / r['t_plain']:.0f} MiB/s) "
            f"| {r['t_source'] / r['t_plain']:.2f}x "
            f"| {r['t_verify']:.2f} s | {r['t_source'] / r['t_verify']:.2f}x |"
        )
    print()
    print(
        "| chunk | start-up reads | chunk bytes needed "
        "| bytes on the wire | share of layer | time | per READ |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['chunk_kib']:.0f} KiB | first 4 KiB of {r['heads']:.0f} files "
            f"| {r['heads_chunks_mib']:.1f} MiB | {r['heads_wire_mib']:.1f} MiB "
            f"| {100 * r['heads_wire_mib'] / r['wire_mib']:.1f}% | {r['t_heads']:.2f} s "
            f"| {1000 * r['t_heads'] / r['heads']:.1f} ms |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="data blob size in MiB")
    parser.add_argument("--files", type=int, default=300, help="files read at start-up")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
