# SPDX-License-Identifier: Apache-2.0
"""Property tests through the project's own reader: build -> read back -> compare."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.materialize import image_reader
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.image.xattrs import FingerprintPrefix
from ondemand_d.store import LocalStore
from tests.root.erofs_tools import diff, snapshot_image, snapshot_tree, trees


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    tree=trees(big_xattrs=6000, max_leaves=20),
    chunk=st.sampled_from([4096, 65536, 1 << 20]),
    inline_max=st.sampled_from([0, 512, 3000]),
)
def test_build_read_back(
    tmp_path_factory: pytest.TempPathFactory, tree: Node, chunk: int, inline_max: int
) -> None:
    """Any generated tree reads back with the same bytes, metadata, xattrs and links."""
    tmp = tmp_path_factory.mktemp("reader")
    files = [c for c in tree.children.values() if c.content is not None]
    if files:
        tree.children[b"hard link"] = files[0]
    store = LocalStore(tmp / "store")
    report = build_image(tree, store, "p", BuildOptions(base_chunk=chunk, inline_max=inline_max))
    reader = image_reader(store, "p")
    assert diff(snapshot_tree(tree), snapshot_image(reader)) == []
    assert [t.decode() for t in reader.device_tags()] == report.blobs


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=trees(max_leaves=8))
def test_rebuild_in_same_store_is_all_reuse(
    tmp_path_factory: pytest.TempPathFactory, tree: Node
) -> None:
    """Building a tree twice writes no new data and gives the same bootstrap."""
    store = LocalStore(tmp_path_factory.mktemp("again") / "store")
    first = build_image(tree, store, "a")
    second = build_image(tree, store, "b")
    assert second.new_blob is None and second.bytes_new == 0
    assert second.bootstrap == first.bootstrap


def test_fingerprints_read_back(tmp_path: Path) -> None:
    """A chunked file carries its odfp2: fingerprint (fingerprint.py) under the chosen prefix;
    inline and empty files carry none."""
    from ondemand_d.image.fingerprint import value

    root = directory()
    root.children.update({b"a": regular(b"a" * 9000), b"b": regular(b"small"), b"e": regular(b"")})
    store = LocalStore(tmp_path / "store")
    build_image(root, store, "fp", BuildOptions(fingerprint=FingerprintPrefix(b"trusted.fp")))
    reader = image_reader(store, "fp")
    a = reader.lookup(b"a")
    chunkbits, ((device, blkaddr),) = reader.chunk_map(a)
    blob = store.get_blob(store.get_image("fp").blob_ids[device])
    assert a.xattrs[b"trusted.fp"] == value(9000, chunkbits, [(blob, blkaddr * 4096)])
    assert b"trusted.fp" not in reader.lookup(b"b").xattrs
    assert b"trusted.fp" not in reader.lookup(b"e").xattrs
