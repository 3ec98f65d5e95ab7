# SPDX-License-Identifier: Apache-2.0
"""Built images in a share domain, and lazy pull from a registry, on the real kernel.

Issue 4's proof: two images from `ondemand-d build`, the second adding one file to
the first, mounted in one domain_id: both read back exactly, and the second mount
OPENs only its own bootstrap and its one new blob.

Issue 5's proof: the host pushes the second image to a docker-registry whose
storage lives in the results share; the guest serves that storage from a
registry on its own loopback, `ondemand-d add`s the image into an empty store
and mounts it by fsid. Reading one small file fetches a small part of the
image (the daemon's counters say how much); reading everything matches the
source byte for byte.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guestlib import (
    Daemon,
    errname,
    guard,
    mount_erofs,
    ondemand_d_argv,
    registry_config,
    start_registry,
    tree_digests,
    umount,
)

pytestmark = pytest.mark.vm

GUEST_REGISTRY = "127.0.0.1:5055"
REPO = "apps/app:v2"

# ------------------------------------------------------------------ host side: inputs


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return proc.stdout


def _tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(60):
        sub = root / f"dir{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 10, 3000, 4096, 70_000, 300_000, 1_500_000])
        (sub / f"file{i:03d}").write_bytes(rng.randbytes(size))
    (root / "big.bin").write_bytes(rng.randbytes(6 << 20))
    (root / "small.bin").write_bytes(rng.randbytes(5000))  # too big to be inlined


def prepare(base: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from registry._server import start_registry, stop_registry  # the registry tests' helper

    v1, v2, store = base / "trees" / "v1", base / "trees" / "v2", base / "store"
    _tree(v1, 1)
    _tree(v2, 1)
    (v2 / "added.bin").write_bytes(random.Random(2).randbytes(2 << 20))
    cli = [*ondemand_d_argv(), "--store", str(store)]
    for name, tree in (("app-v1", v1), ("app-v2", v2)):
        _run([*cli, "build", str(tree), "--name", name, "--json"])
    images = {i["name"]: i for i in json.loads(_run([*cli, "ls", "--json"]))["images"]}
    registry = start_registry(base / "registry")
    try:
        _run([*cli, "push", "app-v2", f"{registry.host}/{REPO}"])
    finally:
        stop_registry(registry)
    registry_config(base / "guest-registry.yml", base / "registry" / "storage", GUEST_REGISTRY)
    manifest = {
        "store": str(store), "images": images,
        "trees": {"v1": tree_digests(v1), "v2": tree_digests(v2)},
        "sources": {"v1": str(v1), "v2": str(v2)},
        "data_bytes": sum(b["size"] for b in images["app-v2"]["blobs"] if b["role"] == "data"),
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def checks(guest: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    results = tmp_path_factory.mktemp("lazy")
    prepare(results / "inputs")
    return guest.checks(__file__, results_dir=results)


def test_second_build_opens_only_its_new_blob(checks: Any) -> None:
    """Two builds in one domain: both read back; the second OPENs its bootstrap and one new blob."""
    data = checks.passed("check_builder_share_domain")
    assert data["second_opens"] == ["app-v2", data["new_blob"]]


def test_registry_image_is_fetched_lazily(checks: Any) -> None:
    """add + mount by fsid: one small file costs a small part of the image; all bytes right."""
    data = checks.passed("check_registry_lazy")
    assert 0 < data["bytes_for_one_file"] < data["data_bytes"] // 4
    assert data["files_compared"] == data["files_expected"]


# ---------------------------------------------------------------- guest side (runs as root)


def _inputs(ctx: Any) -> dict[str, Any]:
    return json.loads((ctx.out.parent / "inputs" / "manifest.json").read_text())


def _mount(target: str, fsid: str, domain: str) -> None:
    rc = mount_erofs(target, fsid, domain=domain, timeout=60)
    assert rc == 0, f"mount of fsid={fsid} failed: {errname(rc)}"


def _umount(target: str) -> None:
    rc = umount(target)
    assert rc == 0, f"umount {target} failed: {errname(rc)}"


def _compare(mnt: str, want: dict[str, str]) -> int:
    got = tree_digests(Path(mnt))
    bad = sorted(k for k in want if got.get(k) != want[k])
    assert not bad and set(got) == set(want), f"{mnt}: wrong or missing files {bad[:5]}"
    return len(want)


@guard(240)
def check_builder_share_domain(ctx: Any) -> None:
    inp = _inputs(ctx)
    v2_blobs = [b for b in inp["images"]["app-v2"]["blobs"] if b["role"] == "data"]
    v1_blobs = {b["blob"] for b in inp["images"]["app-v1"]["blobs"] if b["role"] == "data"}
    (new_blob,) = [b["blob"] for b in v2_blobs if b["blob"] not in v1_blobs]
    ctx.data["new_blob"] = new_blob
    with Daemon(Path(inp["store"]), ctx.cache / "fscache", ctx.out / "daemon.log") as daemon:
        _mount("/mnt/app-v1", "app-v1", "apps")
        _compare("/mnt/app-v1", inp["trees"]["v1"])
        daemon.mark()
        _mount("/mnt/app-v2", "app-v2", "apps")
        _compare("/mnt/app-v2", inp["trees"]["v2"])
        ctx.data["second_opens"] = [e["key"] for e in daemon.events("opened")]
        _compare("/mnt/app-v1", inp["trees"]["v1"])
        _umount("/mnt/app-v2")
        _umount("/mnt/app-v1")
        assert daemon.stop() == 0


def _start_registry(ctx: Any) -> subprocess.Popen[bytes]:
    return start_registry(ctx.out.parent / "inputs" / "guest-registry.yml",
                          ctx.out / "registry.log", GUEST_REGISTRY)


def _stopped(daemon: Daemon) -> dict[str, Any]:
    (line,) = daemon.events("stopped")
    return line


@guard(420)
def check_registry_lazy(ctx: Any) -> None:
    inp = _inputs(ctx)
    ctx.data["data_bytes"] = inp["data_bytes"]
    registry = _start_registry(ctx)
    try:
        store = ctx.tmp / "store"
        out = subprocess.run([*ondemand_d_argv(), "--store", str(store), "add",
                              f"{GUEST_REGISTRY}/{REPO}", "--name", "app-v2"],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, f"add failed: {out.stdout}{out.stderr}"
        cache = ctx.cache / "fscache"
        log = ctx.out / "daemon.log"
        with Daemon(store, cache, log, extra=("--log-level", "info")) as daemon:
            _mount("/mnt/lazy", "app-v2", "lazy")
            data = Path("/mnt/lazy/small.bin").read_bytes()
            assert data == Path(inp["sources"]["v2"], "small.bin").read_bytes()
            _umount("/mnt/lazy")
            assert daemon.stop() == 0
            first = _stopped(daemon)
        ctx.data["bytes_for_one_file"] = first.get("registry_bytes", 0)
        with Daemon(store, cache, log) as daemon:
            _mount("/mnt/lazy", "app-v2", "lazy")
            ctx.data["files_expected"] = len(inp["trees"]["v2"])
            ctx.data["files_compared"] = _compare("/mnt/lazy", inp["trees"]["v2"])
            _umount("/mnt/lazy")
            assert daemon.stop() == 0
            second = _stopped(daemon)
        ctx.data["bytes_for_the_rest"] = second.get("registry_bytes", 0)
        failed = [e for e in daemon.events("read_completed") if e.get("outcome") != "ok"]
        assert not failed, failed[:3]
    finally:
        registry.terminate()
        registry.wait(10)
