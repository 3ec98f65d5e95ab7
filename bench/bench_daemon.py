# SPDX-License-Identifier: Apache-2.0
"""READ throughput and latency of the daemon against the fake kernel.

    python3 bench/bench_daemon.py [--reads N] [--mb N]

For each fill backend (the cffi shim and the pure-Python fallback):
* 4 KiB READs of a blob stored in 4 KiB chunks, with 1, 8 and 64 READs
  outstanding: READs completed per second, p50 and p99 latency (send to
  completion, as the fake kernel sees it);
* MB/s filled from the local store, 1 MiB chunks, every chunk verified.
The fake kernel runs in the same process and event loop, so its own cost is
counted against the daemon. Each workload also runs a baseline in the same
run: a plain loop doing only the unavoidable work per READ (open and read the
chunk file, sha256 it, pwrite it to a cache file), without the protocol,
the event loop or the fake kernel. The ratio daemon/baseline is the number to
compare across machines; this machine's absolute numbers swing with its load
and with how fast its VM maps fresh page-cache pages. The 4 KiB rows also
show the harness alone: the fake kernel and the same workers against a
trivial reader on the loop that only parses each READ, pwrites 4 KiB from an
aligned buffer and completes (no store, no hashing): what any daemon in this
process pays before doing its own work.

The object is a blob opened under an image name; bootstrap prefill is off, so
the READs are all that run (with it, 64 MiB of 4 KiB chunks would be written
in the background during the 4 KiB rows).
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import structlog  # noqa: E402

from fakekernel import FakeKernel, RecordingBackend  # noqa: E402
from ondemand_d import wire  # noqa: E402
from ondemand_d._native import load_backend  # noqa: E402
from ondemand_d.device import Device  # noqa: E402
from ondemand_d.service import Service  # noqa: E402
from ondemand_d.store.fetch import ChunkFetcher  # noqa: E402
from ondemand_d.store.local import LocalStore  # noqa: E402
from ondemand_d.store.model import Image  # noqa: E402

PAGE = 4096


async def _setup(tmp: Path, backend_name: str, size: int, chunk: int, name: str):
    store = LocalStore(tmp / "store")
    src = tmp / f"{name}.src"
    if not src.exists():
        with src.open("wb") as f:  # randbytes() caps at 256 MiB per call
            for _ in range(0, size, 1 << 20):
                f.write(random.Random(1).randbytes(1 << 20))
        store.put_image(Image(name, store.ingest_file(src, chunk).blob_id))
    (tmp / f"cache-{backend_name}-{name}").mkdir(exist_ok=True)
    kernel = FakeKernel(tmp / f"cache-{backend_name}-{name}")
    kernel.start()
    executor = ThreadPoolExecutor(4)
    # No recent-chunk cache: every READ reads its chunk from the store and hashes it.
    fetcher = ChunkFetcher(store, executor, cache_bytes=0)
    service = Service(
        Device(kernel.device_fd, Path("fake")),
        store,
        fetcher,
        RecordingBackend(load_backend(backend_name), kernel),
        executor,
        concurrency=128,
        prefill_bootstrap=False,
    )
    service.start()
    obj = await kernel.open(name.encode())
    return kernel, service, executor, obj


async def _reads(
    tmp: Path, backend_name: str, depth: int, total: int
) -> tuple[float, float, float]:
    size = 64 << 20
    kernel, service, executor, obj = await _setup(tmp, backend_name, size, PAGE, "small")
    rng = random.Random(depth)
    offsets = [rng.randrange(size // PAGE) * PAGE for _ in range(total)]
    latencies: list[float] = []
    it = iter(offsets)

    async def worker() -> None:
        for off in it:
            t0 = time.perf_counter()
            out = kernel.send_read(obj, off, PAGE)
            await out.done.wait()
            latencies.append(time.perf_counter() - t0)
            assert out.present

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    elapsed = time.perf_counter() - start
    await service.drain(5)
    kernel.stop()
    executor.shutdown()
    q = statistics.quantiles(latencies, n=100)
    return total / elapsed, q[49] * 1e3, q[98] * 1e3


async def _harness(tmp: Path, depth: int, total: int) -> float:
    """READs per second of the fake kernel against a reader that does almost nothing."""
    blob = LocalStore(tmp / "store").resolve(b"small")
    (tmp / "cache-harness").mkdir(exist_ok=True)
    kernel = FakeKernel(tmp / "cache-harness")
    kernel.start()
    page = mmap.mmap(-1, PAGE)
    fds: dict[int, int] = {}

    def on_readable() -> None:
        while True:
            try:
                req = wire.parse(os.read(kernel.device_fd, wire.CACHEFILES_MSG_MAX_SIZE))
            except BlockingIOError:
                return
            if isinstance(req, wire.OpenRequest):
                fds[req.object_id] = req.fd
                os.write(kernel.device_fd, wire.format_copen(req.msg_id, blob.size))
            elif isinstance(req, wire.ReadRequest):
                os.pwrite(fds[req.object_id], page, req.off)
                kernel.complete(fds[req.object_id], req.msg_id)

    loop = asyncio.get_running_loop()
    loop.add_reader(kernel.device_fd, on_readable)
    obj = await kernel.open(b"small")
    rng = random.Random(depth + 2000)
    it = iter([rng.randrange(blob.size // PAGE) * PAGE for _ in range(total)])

    async def worker() -> None:
        for off in it:
            out = kernel.send_read(obj, off, PAGE)
            await out.done.wait()
            assert out.present

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    elapsed = time.perf_counter() - start
    loop.remove_reader(kernel.device_fd)
    kernel.stop()
    return total / elapsed


async def _fill_rate(tmp: Path, backend_name: str, mb: int) -> float:
    size = mb << 20
    kernel, service, executor, obj = await _setup(tmp, backend_name, size, 1 << 20, "big")
    start = time.perf_counter()
    outs = [kernel.send_read(obj, off, 128 << 10) for off in range(0, size, 1 << 20)]
    await asyncio.gather(*(o.done.wait() for o in outs))
    elapsed = time.perf_counter() - start
    assert all(o.present for o in outs)
    await service.drain(5)
    kernel.stop()
    executor.shutdown()
    return size / elapsed / 1e6


def _warm_page_cache(tmp: Path, mb: int) -> None:
    """Write and drop a large file first: in a VM the first touch of fresh memory is
    slow, and whichever run came first would pay for it alone."""
    block = bytes(1 << 20)
    path = tmp / "warm-up"
    with path.open("wb") as f:
        for _ in range(mb):
            f.write(block)
    path.unlink()


def _baseline(tmp: Path, name: str, offsets: list[int], span: int) -> float:
    """READs (or chunks) per second for the bare per-READ work, in one thread."""
    store = LocalStore(tmp / "store")
    blob = store.resolve(name.encode())
    # A fresh cache file, as the daemon gets: first writes to new pages cost more.
    fd, path = tempfile.mkstemp(dir=tmp, prefix=f"baseline-{name}-")
    start = time.perf_counter()
    for off in offsets:
        (chunk,) = blob.chunks_for(off, 1)
        data = store.read_chunk(chunk)  # open, read, sha256 and compare
        os.pwrite(fd, data, chunk.offset)
    elapsed = time.perf_counter() - start
    os.close(fd)
    os.unlink(path)
    return len(offsets) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reads", type=int, default=20000, help="READs per depth (default 20000)")
    ap.add_argument("--mb", type=int, default=512, help="MB filled per backend (default 512)")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40),
                        cache_logger_on_first_use=True)
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/var/tmp")) as d:
        tmp = Path(d)
        _warm_page_cache(tmp, 2 * args.mb)
        for backend in ("cffi", "python"):
            for depth in (1, 8, 64):
                with asyncio.Runner(loop_factory=factory) as r:
                    rate, p50, p99 = r.run(_reads(tmp, backend, depth, args.reads))
                rng = random.Random(depth + 1000)
                offsets = [rng.randrange((64 << 20) // PAGE) * PAGE for _ in range(args.reads)]
                base = _baseline(tmp, "small", offsets, PAGE)
                with asyncio.Runner(loop_factory=factory) as r:
                    harness = r.run(_harness(tmp, depth, args.reads))
                rows.append((backend, f"4 KiB READs, depth {depth}", f"{rate:,.0f} READs/s",
                             f"{base:,.0f} READs/s", f"{rate / base:.2f}",
                             f"{harness:,.0f} READs/s ({harness / base:.2f})",
                             f"{p50:.3f} ms", f"{p99:.3f} ms"))
                print(*rows[-1], sep=" | ", file=sys.stderr)
            with asyncio.Runner(loop_factory=factory) as r:
                mbs = r.run(_fill_rate(tmp, backend, args.mb))
            base = _baseline(tmp, "big", list(range(0, args.mb << 20, 1 << 20)), 1 << 20)
            base_mbs = base * (1 << 20) / 1e6
            rows.append((backend, "1 MiB chunks, verified", f"{mbs:,.0f} MB/s",
                         f"{base_mbs:,.0f} MB/s", f"{mbs / base_mbs:.2f}", "", "", ""))
            print(*rows[-1], sep=" | ", file=sys.stderr)
    print("| backend | workload | daemon | baseline | daemon/baseline | harness only (/baseline) "
          "| p50 | p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"benchmark done: {len(rows)} rows, {args.reads} READs per depth, {args.mb} MB per fill run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
