# SPDX-License-Identifier: Apache-2.0
"""Crash matrix (issue 10, section 2): kill -9, ENOSPC and EIO at every write, fsync,
rename and unlink of build, import, rm and gc; the whole store is checked after each."""
from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashlib import run_matrix, snapshot
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.importer import import_image
from ondemand_d.store.gc import gc, rm
from ondemand_d.store.local import LocalStore

MiB = 1 << 20


def _tree(version: int) -> Node:
    root = directory(mtime_ns=10**18)
    root.children[b"shared"] = regular(random.Random(1).randbytes(MiB + 5000), mtime_ns=10**18)
    root.children[b"own"] = regular(random.Random(10 + version).randbytes(64 << 10),
                                    mtime_ns=10**18)
    root.children[b"small"] = regular(b"v%d" % version, mtime_ns=10**18)
    return root


def _mkfs(tmp: Path, name: str, seed: int) -> tuple[Path, Path]:
    src = tmp / f"{name}-src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(seed).randbytes(300_000))
    meta, blob = tmp / f"{name}.meta", tmp / f"{name}.blob"
    subprocess.run(["mkfs.erofs", "--chunksize=65536", f"--blobdev={blob}", str(meta), str(src)],
                   check=True, capture_output=True)
    return meta, blob


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """On tmpfs when there is one: the matrix tests the order of steps, not the disk, and
    every syncfs on a shared ext4 would wait for everybody's dirty pages."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    where = Path(tempfile.mkdtemp(prefix="store-crash-", dir=shm))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A store with two built images ("img" v1 and "other", sharing data) and an import."""
    root = tmp_path / "base"
    store = LocalStore(root)
    build_image(_tree(1), store, "img")
    build_image(_tree(3), store, "other")
    meta, blob = _mkfs(tmp_path, "imp1", 1)
    import_image(store, "imp", meta, [(blob, "imp-data")], chunk_size=64 << 10)
    return root


def _states(base: Path, tmp: Path, op) -> dict[str, object]:
    """Every image's snapshot before and after `op` (run on a scratch copy)."""
    scratch = tmp / "scratch"
    shutil.copytree(base, scratch)
    before_store, names = LocalStore(base), ("img", "other", "imp", "new")
    before = {n: snapshot(before_store, n) for n in names}
    op(LocalStore(scratch))
    after = {n: snapshot(LocalStore(scratch), n) for n in names}
    shutil.rmtree(scratch)
    return {"before": before, "after": after}


def _matrix(base: Path, tmp: Path, op) -> dict[str, int]:
    states = _states(base, tmp, op)
    before, after = states["before"], states["after"]
    allowed = {n: {before[n], after[n]} for n in before}
    changed = {n: s for n, s in after.items() if s != before[n]}  # none for gc: check all
    outcomes = run_matrix(base, tmp / "work", op, allowed, changed or after)
    assert outcomes["killed"] and outcomes["failed"], outcomes
    return outcomes


def test_build_replace_crash_matrix(base: Path, tmp_path: Path) -> None:
    def op(store: LocalStore) -> None:
        build_image(_tree(2), store, "img", BuildOptions(replace=True))

    _matrix(base, tmp_path, op)


def test_build_new_image_crash_matrix(base: Path, tmp_path: Path) -> None:
    def op(store: LocalStore) -> None:
        if not store.has_image("new"):
            build_image(_tree(4), store, "new")

    _matrix(base, tmp_path, op)


def test_import_replace_crash_matrix(base: Path, tmp_path: Path) -> None:
    meta, blob = _mkfs(tmp_path, "imp2", 2)

    def op(store: LocalStore) -> None:
        import_image(store, "imp", meta, [(blob, "imp-data")], chunk_size=64 << 10,
                     replace=True)

    _matrix(base, tmp_path, op)


def test_rm_crash_matrix(base: Path, tmp_path: Path) -> None:
    def op(store: LocalStore) -> None:
        if store.has_image("imp"):
            rm(store, ["imp"])

    _matrix(base, tmp_path, op)


def test_gc_crash_matrix(base: Path, tmp_path: Path) -> None:
    """gc after rm of an image that shares data: killed at every unlink, the rest stays whole."""
    rm(LocalStore(base), ["img", "imp"])

    def op(store: LocalStore) -> None:
        gc(store)

    outcomes = _matrix(base, tmp_path, op)
    assert sum(outcomes.values()) >= 3 * 5  # at least five blob records and chunks to remove
