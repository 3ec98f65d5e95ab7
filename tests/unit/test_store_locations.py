# SPDX-License-Identifier: Apache-2.0
"""Locations per image (store/locations.py, model.Location, the records): no registry needed."""

from __future__ import annotations

import asyncio

import pytest

from ondemand_d.errors import FetchError, StoreError, UnknownName
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.source import RegistrySource
from ondemand_d.store import gc
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import LOCATIONS, locate
from ondemand_d.store.model import Blob, Chunk, Image, Location, RemoteRange

CHUNK = 8192


def remote_blob(registry: str, layer: str = "sha256:" + "a" * 64) -> Blob:
    """Three chunks in one registry layer of `registry`; the id depends on the table only."""
    chunks = tuple(Chunk(i * CHUNK, CHUNK, f"{i:064x}", RemoteRange(layer, i * 100, 100, "zstd"))
                   for i in range(3))
    return Blob.of(chunks, {"remote": {"registry": registry, "repository": "app"}})


def add_image(store: LocalStore, name: str, blob: Blob) -> Image:
    """What `add` writes: the blob record (kept if present), a location, the image naming it."""
    boot = Blob.of((Chunk(0, CHUNK, store.put_chunk(name.encode().ljust(CHUNK, b"\0"))),))
    location = Location.of(blob)
    assert location is not None
    with store.transaction():
        store.put_blob(boot)
        store.put_blob(blob)
        store.put_location(location)
        image = Image(name, boot.blob_id, ((blob.blob_id, blob.blob_id),),
                      {LOCATIONS: {blob.blob_id: location.location_id}})
        store.put_image(image)
    return image


def test_one_content_two_locations_each_image_its_own(tmp_path):
    """Same blob id from two registries: the record is the first's, each image locates its own."""
    store = LocalStore(tmp_path)
    first, second = remote_blob("a.example"), remote_blob("b.example", "sha256:" + "b" * 64)
    assert first.blob_id == second.blob_id
    add_image(store, "first", first)
    add_image(store, "second", second)
    assert store.get_blob(first.blob_id).extra["remote"]["registry"] == "a.example"
    got = locate(store, store.get_blob(first.blob_id), ["second"])
    assert got.extra["remote"]["registry"] == "b.example"
    assert {c.remote.blob for c in got.chunks if c.remote} == {"sha256:" + "b" * 64}
    assert all(c.remote and c.remote.registry == "b.example" for c in got.chunks)
    assert len(store.location_ids()) == 2


def test_unknown_opener_and_disagreeing_images_fail_closed(tmp_path):
    """No known opener and two locations: the fetch fails with a sentence, at no registry."""
    store = LocalStore(tmp_path)
    add_image(store, "first", remote_blob("a.example"))
    blob = remote_blob("b.example")
    add_image(store, "second", blob)
    got = locate(store, store.get_blob(blob.blob_id), [])
    source = RegistrySource(RegistryConfig())
    with pytest.raises(FetchError, match="no registry location: 2 images name different"):
        asyncio.run(source.fetch(got, got.chunks[:1]))
    asyncio.run(source.aclose())
    assert source.client.requests == 0


def test_unknown_opener_and_one_location_is_that_location(tmp_path):
    """Only one image lists the blob: it is located there even before a bootstrap was seen."""
    store = LocalStore(tmp_path)
    blob = remote_blob("b.example")
    add_image(store, "only", blob)
    assert locate(store, store.get_blob(blob.blob_id), []).extra["remote"]["registry"] == \
        "b.example"


def test_a_damaged_or_missing_location_record_is_no_location(tmp_path):
    """A damaged record is refused, a missing one is UnknownName; either way no fallback."""
    store = LocalStore(tmp_path)
    add_image(store, "first", remote_blob("a.example"))
    blob = remote_blob("b.example")
    add_image(store, "second", blob)
    (location_id,) = store.get_image("second").extra[LOCATIONS].values()
    path = store.location_path(location_id)
    path.write_text(path.read_text().replace("b.example", "a.example"))
    with pytest.raises(StoreError, match="does not match its name"):
        store.get_location(location_id)
    got = locate(store, store.get_blob(blob.blob_id), ["second"])
    assert "remote" not in got.extra and "does not match its name" in got.extra["unlocated"]
    path.unlink()
    with pytest.raises(UnknownName):
        store.get_location(location_id)


def test_gc_removes_only_the_locations_no_image_names(tmp_path):
    """rm + gc drops the removed image's location; the blob and the other's location stay."""
    store = LocalStore(tmp_path)
    blob = remote_blob("a.example")
    add_image(store, "first", blob)
    add_image(store, "second", remote_blob("b.example"))
    gc.rm(store, ["first"])
    assert gc.gc(store, dry_run=True).locations == 1
    assert len(store.location_ids()) == 2  # a dry run removes nothing
    assert gc.gc(store).locations == 1
    assert store.has_blob(blob.blob_id)
    assert locate(store, store.get_blob(blob.blob_id), []).extra["remote"]["registry"] == \
        "b.example"


def test_location_records_round_trip_and_refuse_a_foreign_table(tmp_path):
    """A location applies only to the blob and chunk table it was recorded for."""
    blob = remote_blob("a.example")
    location = Location.of(blob)
    assert location is not None
    assert Location.from_json(location.to_json()) == location
    other = Blob.of((Chunk(0, CHUNK, "f" * 64, RemoteRange("sha256:" + "c" * 64, 0, 1)),))
    with pytest.raises(StoreError, match="does not fit"):
        location.apply(other)
    with pytest.raises(StoreError, match="malformed"):
        Location.from_json({"blob_id": blob.blob_id, "registry": "x"})


def test_a_built_image_is_local_only_and_never_borrows_an_added_location(tmp_path):
    """`build` writes `locations: {}`; a blob record `add` wrote first does not give the
    built image a registry (its missing chunks fail), nor a volume that holds both."""
    from ondemand_d.image.build import build_image
    from ondemand_d.image.tree import directory, regular

    store = LocalStore(tmp_path)
    root = directory(mtime_ns=10**18)
    root.children[b"f"] = regular(b"x" * 10_000, mtime_ns=10**18)
    build_image(root, store, "built")
    built = store.get_image("built")
    assert built.extra == {LOCATIONS: {}}
    blob = remote_blob("a.example")
    add_image(store, "added", blob)
    local = Image("local", built.bootstrap, ((blob.blob_id, blob.blob_id),), built.extra)
    store.put_image(local)
    got = locate(store, store.get_blob(blob.blob_id), ["local"])
    assert "remote" not in got.extra
    assert "was built or imported here and reads only this store" in got.extra["unlocated"]
    assert "unlocated" in locate(store, store.get_blob(blob.blob_id), []).extra
    assert locate(store, store.get_blob(blob.blob_id), ["added"]).extra["remote"] == {
        "registry": "a.example", "repository": "app"}
