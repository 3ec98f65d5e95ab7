# SPDX-License-Identifier: Apache-2.0
"""Files with runs of zeros, built at 4K, 64K and 1M chunk sizes, read byte-exactly (issue 13).

On the fscache path, 6.12's `erofs_fscache_data_read_slice` zero-fills the whole rest of
a read request when it meets an unmapped chunk, so a hole followed by data in the same
file read back as zeros beyond the hole. The host builds one tree whose files have zero
runs at many alignments and lengths (leading, inner, trailing, unaligned, alternating,
sparse on disk) with `ondemand-d build --chunk-size` 4K, 64K and 1M into one store; the
guest serves it with `ondemand-d serve`, mounts each image cold and compares every byte
of every file with the source.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guestlib import Daemon, errname, guard, mount_erofs, ondemand_d_argv, umount

pytestmark = pytest.mark.vm

KiB, MiB = 1 << 10, 1 << 20
CHUNK_SIZES = {"4K": 4 * KiB, "64K": 64 * KiB, "1M": MiB}

#: (name, segments): "d" random data, "z" zeros, "s" a hole on disk (seek), lengths in bytes.
PATTERNS: list[tuple[str, list[tuple[str, int]]]] = [
    ("z4k-aligned", [("d", 4 * KiB), ("z", 4 * KiB), ("d", 4 * KiB), ("z", 8 * KiB), ("d", 100)]),
    ("z4k-unaligned", [("d", 5000), ("z", 9000), ("d", 3000)]),
    ("alternating-4k", [("d", 4 * KiB), ("z", 4 * KiB)] * 64 + [("d", 1)]),
    ("z64k-aligned", [("d", 64 * KiB), ("z", 64 * KiB), ("d", 64 * KiB), ("z", 128 * KiB),
                      ("d", 10)]),
    ("z64k-unaligned", [("d", 70_000), ("z", 200_000), ("d", 70_000)]),
    ("z1m-aligned", [("d", MiB), ("z", MiB), ("d", MiB)]),
    ("z1m-leading", [("z", 2 * MiB), ("d", 300 * KiB)]),
    ("z1m-unaligned", [("d", 3 * MiB // 2), ("z", 5 * MiB // 2), ("d", 3 * MiB // 2 + 123)]),
    ("zeros-then-tail", [("d", 8 * KiB), ("z", 2 * MiB), ("d", 5)]),
    ("trailing-zeros", [("d", MiB + 5), ("z", 3 * MiB)]),
    ("all-zero-big", [("z", 3 * MiB)]),
    ("all-zero-small", [("z", 10_000)]),
    ("sparse-on-disk", [("d", 4 * KiB), ("s", 5 * MiB), ("d", 4 * KiB)]),
]


# ------------------------------------------------------------------ host side: inputs


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return proc.stdout


def _write(path: Path, segments: list[tuple[str, int]], rng: random.Random) -> None:
    with path.open("wb") as out:
        for kind, length in segments:
            if kind == "s":
                out.seek(length, 1)
            else:
                out.write(rng.randbytes(length) if kind == "d" else bytes(length))
        out.truncate()


def _random_segments(rng: random.Random) -> list[tuple[str, int]]:
    """A mix of data and zero runs of random lengths, some block-aligned, most not."""
    out = []
    for i in range(40):
        length = rng.choice([4 * KiB, 64 * KiB, rng.randrange(1, 300 * KiB)])
        out.append(("z" if i % 2 else "d", length))
    return out


def make_tree(root: Path, seed: int = 13) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for name, segments in PATTERNS:
        _write(root / name, segments, rng)
    for i in range(3):
        _write(root / f"mixed-{i}", _random_segments(rng), rng)


def prepare(base: Path) -> dict[str, Any]:
    tree, store = base / "tree", base / "store"
    make_tree(tree)
    cli = [*ondemand_d_argv(), "--store", str(store)]
    reports = {}
    for label, size in CHUNK_SIZES.items():
        out = _run([*cli, "build", str(tree), "--name", f"zeros-{label}",
                    "--chunk-size", str(size), "--json"])
        reports[label] = json.loads(out)
    manifest = {"store": str(store), "tree": str(tree), "reports": reports,
                "files": sorted(p.name for p in tree.iterdir())}
    (base / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def checks(guest: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    results = tmp_path_factory.mktemp("zeros")
    prepare(results / "inputs")
    return guest.checks(__file__, results_dir=results)


@pytest.mark.parametrize("label", list(CHUNK_SIZES))
def test_zero_runs_read_back_exactly(checks: Any, label: str) -> None:
    """Every byte of every file with zero runs matches the source through the real kernel."""
    data = checks.passed("check_zero_runs")
    got = data["images"][label]
    assert got["wrong"] == {}, f"--chunk-size {label}: files that read back wrong: {got['wrong']}"
    assert got["compared"] == len(PATTERNS) + 3
    assert got["bytes"] > 30 * MiB  # every byte of every file went through the mount


# ---------------------------------------------------------------- guest side (runs as root)


def _first_difference(got: bytes, want: bytes) -> dict[str, int]:
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
              min(len(got), len(want)))
    end = at
    while end < min(len(got), len(want)) and got[end] != want[end]:
        end += 1
    return {"first_bad": at, "bad_run_end": end, "got_len": len(got), "want_len": len(want)}


@guard(300)
def check_zero_runs(ctx: Any) -> None:
    inp = json.loads((ctx.out.parent / "inputs" / "manifest.json").read_text())
    tree = Path(inp["tree"])
    ctx.data["images"] = images = {}
    with Daemon(Path(inp["store"]), ctx.cache / "fscache", ctx.out / "daemon.log") as daemon:
        for label in CHUNK_SIZES:
            mnt = f"/mnt/zeros-{label}"
            rc = mount_erofs(mnt, f"zeros-{label}", domain="zeros", timeout=60)
            assert rc == 0, f"mount of zeros-{label} failed: {errname(rc)}"
            wrong: dict[str, Any] = {}
            total = 0
            for name in inp["files"]:
                got = Path(mnt, name).read_bytes()  # cold, sequential: kernel readahead spans runs
                want = (tree / name).read_bytes()
                total += len(got)
                if got != want:
                    wrong[name] = _first_difference(got, want)
            images[label] = {"compared": len(inp["files"]), "bytes": total, "wrong": wrong}
            rc = umount(mnt)
            assert rc == 0, f"umount {mnt} failed: {errname(rc)}"
        failed = [e for e in daemon.events("read_completed") if e.get("outcome") != "ok"]
        assert not failed, failed[:3]
        assert daemon.stop() == 0
    print(json.dumps({k: len(v["wrong"]) for k, v in images.items()}), file=sys.stderr)
