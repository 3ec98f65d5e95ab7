# SPDX-License-Identifier: Apache-2.0
"""Built images served by the daemon to the fake kernel, read back as fscache mode would.

The kernel OPENs the fsid (the bootstrap) and each device-slot tag (a blob
id), then READs 4 KiB-aligned ranges. Here the fake kernel does the same and
the project's reader parses what landed in the cache files.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog

from fakekernel import FakeKernel, RecordingBackend
from ondemand_d._native import load_backend
from ondemand_d.device import Device
from ondemand_d.image.build import build_image
from ondemand_d.image.reader import ImageReader, device_tags
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.service import Service
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore
from tests.root.erofs_tools import diff, snapshot_image, snapshot_tree

MiB = 1 << 20


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[LocalStore, FakeKernel]]:
    """A daemon Service over a real store, talking to the fake kernel."""
    store = LocalStore(tmp_path / "store")
    (tmp_path / "cache").mkdir()
    kernel = FakeKernel(tmp_path / "cache")
    kernel.start()
    executor = ThreadPoolExecutor(2)
    backend = RecordingBackend(load_backend("python"), kernel)
    service = Service(
        Device(kernel.device_fd, Path("fake")),
        store,
        ChunkFetcher(store, executor),
        backend,
        executor,
    )
    with structlog.testing.capture_logs():
        service.start()
        yield store, kernel
        await service.drain(5)
    kernel.stop()
    executor.shutdown()


async def _fetch_whole(kernel: FakeKernel, key: bytes) -> bytes:
    """OPEN `key`, READ all of it in 1 MiB steps, return the cache file's bytes."""
    obj = await kernel.open(key)
    assert obj.copen_result is not None and obj.copen_result > 0, key
    for off in range(0, obj.copen_result, MiB):
        assert await kernel.read(obj, off, min(MiB, obj.copen_result - off))
    return kernel.cache_bytes(obj)[: obj.copen_result]


def _tree(extra: bytes = b"") -> Node:
    root = directory(mtime_ns=10**18)
    root.children.update(
        {
            b"big": regular(bytes(range(256)) * (12 * 1024), mtime_ns=10**18),  # 3 MiB
            b"small": regular(b"s" * 20000, mtime_ns=10**18),
            b"inline": regular(b"tiny", mtime_ns=10**18),
        }
    )
    if extra:
        root.children[b"added"] = regular(extra, mtime_ns=10**18)
    return root


async def test_daemon_serves_built_images(served: tuple[LocalStore, FakeKernel]) -> None:
    """fsid -> bootstrap, tag -> blob: what the daemon serves reads back as the tree."""
    store, kernel = served
    first_tree, second_tree = _tree(), _tree(os.urandom(MiB + 5))
    build_image(first_tree, store, "v1")
    build_image(second_tree, store, "v2")
    opened: dict[bytes, bytes] = {}
    for name, tree in ((b"v1", first_tree), (b"v2", second_tree)):
        primary = await _fetch_whole(kernel, name)
        blobs = []
        for tag in device_tags(primary):
            if tag not in opened:  # one domain: a blob already open is not OPENed again
                opened[tag] = await _fetch_whole(kernel, tag)
            blobs.append(opened[tag])
        reader = ImageReader(primary, [lambda o, n, b=b: b[o : o + n] for b in blobs])
        assert diff(snapshot_tree(tree), snapshot_image(reader)) == []
    v1, v2 = store.get_image("v1"), store.get_image("v2")
    # The second image shares the first one's data blob and adds exactly one.
    assert v2.devices[0] == v1.devices[0] and len(v2.devices) == 2 == len(opened)
