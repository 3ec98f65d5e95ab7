# SPDX-License-Identifier: Apache-2.0
"""rm and gc (issue 10, section 4): exactly the unshared bytes are freed, an open image's
blobs survive until closed, a build racing gc loses nothing."""
from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from crashlib import snapshot
from ondemand_d.image.build import build_image
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.store.fsck import fsck
from ondemand_d.store.gc import gc, rm
from ondemand_d.store.local import LocalStore

MiB = 1 << 20


def _tree(*seeds: int) -> Node:
    root = directory(mtime_ns=10**18)
    for seed in seeds:
        root.children[b"f%d" % seed] = regular(random.Random(seed).randbytes(MiB + 77 * seed),
                                               mtime_ns=10**18)
    return root


def _chunk_files(store: LocalStore) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (store.root / "chunks").rglob("*") if p.is_file()}


def test_gc_after_rm_frees_exactly_the_unshared_bytes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    build_image(_tree(1, 2), store, "a")
    build_image(_tree(2, 3, 4), store, "b")  # shares f2 with a
    a_before = snapshot(store, "a")
    chunks_before = _chunk_files(store)
    a_chunks = {c.digest for b in store.get_image("a").blob_ids for c in store.get_blob(b).chunks}
    removed = rm(store, ["b"])
    unshared_chunks, unshared_bytes = removed.unshared["b"]
    dry = gc(store, dry_run=True)
    assert _chunk_files(store) == chunks_before  # a dry run removes nothing
    report = gc(store)
    assert (report.chunks, report.bytes) == (dry.chunks, dry.bytes)
    assert (report.chunks, report.bytes) == (unshared_chunks, unshared_bytes)
    after = _chunk_files(store)
    assert set(after) == a_chunks
    assert sum(chunks_before.values()) - sum(after.values()) == unshared_bytes
    assert report.blobs == 2  # b's bootstrap and its own data blob
    assert snapshot(store, "a") == a_before
    assert not fsck(store).problems
    again = gc(store)
    assert (again.blobs, again.chunks, again.bytes) == (0, 0, 0)


async def test_open_blobs_survive_gc_until_closed(env) -> None:
    """The daemon has b's data blob open: rm + gc keep it, READs still verify; CLOSE frees it."""
    build_image(_tree(5), env.store, "b")
    (_, data_id), = env.store.get_image("b").devices
    obj = await env.kernel.open(data_id.encode())
    assert obj.copen_result and obj.copen_result > 0
    rm(env.store, ["b"])
    first = gc(LocalStore(env.store.root))  # another process's view: only the lease file
    assert first.kept_for_leases == 1 and first.blobs == 1  # the bootstrap went, the data stayed
    assert await env.kernel.read(obj, 0, MiB)
    assert env.kernel.cache_bytes(obj)[:MiB] == random.Random(5).randbytes(MiB + 77 * 5)[:MiB]
    env.kernel.close(obj)
    for _ in range(200):
        if data_id not in env.store.lease.held:
            break
        await asyncio.sleep(0.01)
    second = gc(LocalStore(env.store.root))
    assert second.blobs == 1 and second.kept_for_leases == 0 and second.chunks >= 2
    assert env.store.blob_ids() == []


def test_leases_of_dead_processes_are_ignored(tmp_path: Path) -> None:
    """A daemon killed with blobs open leaves a lease file; its lock is free, so gc drops it."""
    store = LocalStore(tmp_path / "store")
    build_image(_tree(6), store, "x")
    leases = store.root / "leases"
    (leases / "999999-dead.lock").write_text("")
    (leases / "999999-dead.json").write_text(f'["{store.get_image("x").bootstrap}"]')
    rm(store, ["x"])
    report = gc(store)
    assert report.kept_for_leases == 0 and report.blobs == 2
    assert not any(leases.iterdir())


def test_build_racing_gc_loses_nothing(tmp_path: Path) -> None:
    """Builds and gcs in two threads (separate store objects, as separate processes)."""
    root = tmp_path / "store"
    LocalStore(root)
    stop = threading.Event()
    errors: list[BaseException] = []
    runs = [0]

    def collect() -> None:
        try:
            while not stop.is_set():
                gc(LocalStore(root))
                runs[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    collector = threading.Thread(target=collect)
    collector.start()
    builder = LocalStore(root)
    try:
        for i in range(6):
            build_image(_tree(10 + i, 10 + i + 1), builder, f"img{i}")
            if i % 2:
                rm(builder, [f"img{i - 1}"])
    finally:
        stop.set()
        collector.join()
    assert not errors and runs[0] > 0
    gc(builder)
    reference = LocalStore(tmp_path / "reference")
    for i in (1, 3, 5):
        build_image(_tree(10 + i, 10 + i + 1), reference, f"img{i}")
        assert snapshot(builder, f"img{i}") == snapshot(reference, f"img{i}")
    assert [i.name for i in builder.images()] == ["img1", "img3", "img5"]
    assert not fsck(builder).problems


@pytest.mark.damages_store
async def test_a_store_without_lease_files_still_serves(env) -> None:
    """A read-only store (no gc.lock, no leases/ to write): OPENs and READs go on."""
    build_image(_tree(7), env.store, "ro")
    (env.store.root / "leases").rmdir()
    (env.store.root / "leases").write_text("not a directory")
    (env.store.root / "gc.lock").unlink(missing_ok=True)
    (env.store.root / "gc.lock").mkdir()
    (_, data_id), = env.store.get_image("ro").devices
    obj = await env.kernel.open(data_id.encode())
    assert obj.copen_result and obj.copen_result > 0
    assert await env.kernel.read(obj, 0, MiB)
    assert env.kernel.cache_bytes(obj)[:MiB] == random.Random(7).randbytes(MiB + 77 * 7)[:MiB]
