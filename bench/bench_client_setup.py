# SPDX-License-Identifier: Apache-2.0
"""Benchmark: what the first remote READ pays before its Range GET (not part of the suite).

    PYTHONPATH=. python3 bench/bench_client_setup.py [--guest]

The daemon creates its registry source on the first chunk that lives in a
registry (daemon.LazyRemoteSource), so that READ pays, in this order:

1. importing the registry stack (aiohttp, yarl, zstandard, ...): aiohttp's
   connector builds its default TLS contexts at import, loading the system CA
   store;
2. the source and client objects (reads the docker config);
3. the HTTP session: a TLS context of our own (a second CA-store load) and the
   connection pool;
4. the scheme probe of a loopback registry (a TLS hello that fails: plain HTTP)
   and the first request's connection;
5. the first 64 KiB Range GET itself; then a second one, already warm.

Each step is timed in a fresh interpreter against a local docker-registry.
`--guest` runs the same measurement in the real-kernel guest (TCG), where the
issue saw 3 s: both tables are printed, with the guest/host ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["import", "objects", "session", "probe + connect", "first GET", "warm GET"]


def measure() -> dict[str, float]:
    """Run in a fresh interpreter: seconds per step (registry started first, untimed)."""
    import asyncio  # noqa: PLC0415 - asyncio itself is loaded by the daemon long before

    sys.path.insert(0, str(ROOT / "bench"))
    from _registry import start_registry  # noqa: PLC0415 - imports nothing heavy

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-client-") as d:
        proc, host = start_registry(Path(d))
        try:
            digest = _upload(host)
            t = time.perf_counter()
            from ondemand_d.registry.config import RegistryConfig  # noqa: PLC0415
            from ondemand_d.registry.source import make_source  # noqa: PLC0415
            out["import"] = time.perf_counter() - t

            async def run() -> None:
                t = time.perf_counter()
                source = make_source(RegistryConfig())
                out["objects"] = time.perf_counter() - t
                t = time.perf_counter()
                source.client._get_session()  # noqa: SLF001 - the step being measured
                out["session"] = time.perf_counter() - t
                t = time.perf_counter()
                await source.client.base(host)
                out["probe + connect"] = time.perf_counter() - t
                for step in ("first GET", "warm GET"):
                    t = time.perf_counter()
                    await _one_get(source.client, host, digest)
                    out[step] = time.perf_counter() - t
                await source.aclose()

            asyncio.run(run())
        finally:
            proc.terminate()
            proc.wait(10)
    return out


DATA = bytes(range(256)) * 256  # 64 KiB


def _upload(host: str) -> str:
    """Put DATA in the registry with plain urllib (untimed, before the stack is imported)."""
    import hashlib  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
    start = urllib.request.Request(  # noqa: S310 - loopback
        f"http://{host}/v2/bench/setup/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start) as resp:  # noqa: S310
        where = resp.headers["Location"]
    where = where if where.startswith("http") else f"http://{host}{where}"
    sep = "&" if "?" in where else "?"
    put = urllib.request.Request(f"{where}{sep}digest={digest}", data=DATA, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(put):  # noqa: S310
        pass
    return digest


async def _one_get(client: object, host: str, digest: str) -> None:
    got = await client.get_range(host, "bench/setup", digest, 0, len(DATA))  # type: ignore[attr-defined]
    assert got == DATA


def fresh(argv_prefix: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """`measure()` in a new interpreter (the import step must start cold)."""
    code = "import json, bench_client_setup as b; print(json.dumps(b.measure()))"
    out = subprocess.run([*argv_prefix, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}, cwd=ROOT / "bench")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_guest() -> dict[str, float]:
    from ondemand_d.guest.runner import guest_python, run_in_guest  # noqa: PLC0415

    code = ("import sys, json, subprocess; "
            "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True); "
            f"sys.path[:0] = [{str(ROOT / 'bench')!r}, {str(ROOT)!r}]; "
            "import bench_client_setup as b; print(json.dumps(b.measure()))")
    with tempfile.TemporaryDirectory(prefix="bench-client-guest-") as d:
        result = run_in_guest([guest_python(), "-c", code], env={"PYTHONPATH": str(ROOT)},
                              timeout=600, results_dir=Path(d), cwd=str(ROOT / "bench"))
        result.check()
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guest", action="store_true", help="also measure in the real-kernel guest")
    p.add_argument("--repeat", type=int, default=3, help="host runs (best of)")
    args = p.parse_args()
    runs = [fresh([sys.executable], {"PYTHONPATH": str(ROOT)}) for _ in range(args.repeat)]
    host = {k: min(r[k] for r in runs) for k in STEPS}
    guest = in_guest() if args.guest else None
    head = "| step | host ms |" + (" guest (TCG) ms | guest/host |" if guest else "")
    print(head)
    print("|---|---:|" + ("---:|---:|" if guest else ""))
    for k in [*STEPS, "total"]:
        h = sum(host[s] for s in STEPS) if k == "total" else host[k]
        line = f"| {k} | {1000 * h:.1f} |"
        if guest:
            g = sum(guest[s] for s in STEPS) if k == "total" else guest[k]
            line += f" {1000 * g:.0f} | {g / h:.0f}x |"
        print(line)
    print()
    print(f"host: best of {args.repeat} fresh interpreters" + ("; guest: one run" if guest else ""))


if __name__ == "__main__":
    main()
