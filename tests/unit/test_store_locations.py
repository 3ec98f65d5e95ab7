# SPDX-License-Identifier: Apache-2.0
"""Locations per image (store/locations.py, model.Location, the records): no registry needed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ondemand_d.errors import FetchError, StoreError, UnknownName
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.source import RegistrySource
from ondemand_d.store import gc
from ondemand_d.store.fsck import fsck
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


@pytest.mark.damages_store
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


def _two_images(store: LocalStore) -> tuple[Blob, Path]:
    """first (a.example) and second (b.example) share a blob; return it and second's location."""
    add_image(store, "first", remote_blob("a.example"))
    blob = remote_blob("b.example")
    add_image(store, "second", blob)
    (location_id,) = store.get_image("second").extra[LOCATIONS].values()
    return blob, store.location_path(location_id)


def test_fsck_is_clean_with_sound_locations(tmp_path):
    store = LocalStore(tmp_path)
    _two_images(store)
    assert fsck(store).problems == []


@pytest.mark.damages_store
@pytest.mark.parametrize("damage", ["content", "not-json", "fifo", "directory"])
def test_fsck_reports_a_damaged_or_unreadable_location_and_repair_quarantines_it(
        tmp_path, damage):
    """The problem names the image it hurts; --repair moves it to quarantine/ and says the
    image lost it; a FIFO there is reported, not read (no hang)."""
    store = LocalStore(tmp_path)
    _, path = _two_images(store)
    text = path.read_text()
    path.unlink()
    if damage == "content":
        path.write_text(text.replace("b.example", "c.example"))
    elif damage == "not-json":
        path.write_text("[" * 100_000)
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    (problem,) = fsck(store).problems
    assert (problem.kind, problem.path, problem.images, problem.repaired) == (
        "location-record", str(path), ("second",), "")
    repaired = fsck(store, repair=True).problems
    assert [(p.kind, p.images) for p in repaired] == [
        ("location-record", ("second",)), ("location-missing", ("second",))]
    assert repaired[0].repaired.startswith("quarantined to ")
    assert not path.exists() and not path.is_symlink()
    (left,) = fsck(store).problems
    assert (left.kind, left.images, left.repaired) == ("location-missing", ("second",), "")


def test_fsck_a_location_for_a_missing_blob_or_another_chunk_count_is_damage(tmp_path):
    """Sound JSON, named by its content, yet wrong for the store: reported and quarantined."""
    store = LocalStore(tmp_path)
    blob, _ = _two_images(store)
    ghost = Location("f" * 64, "x.example", "app", (RemoteRange("sha256:" + "d" * 64, 0, 9),))
    short = Location(blob.blob_id, "x.example", "app", (RemoteRange("sha256:" + "d" * 64, 0, 9),))
    ghost_path = store.location_path(store.put_location(ghost))
    short_path = store.location_path(store.put_location(short))
    details = {p.path: p.detail for p in fsck(store, repair=True).problems}
    assert details == {
        str(ghost_path): f"names blob {'f' * 64}, which is not in the store",
        str(short_path): f"has 1 range(s) but blob {blob.blob_id} has 3 chunk(s)",
    }
    assert not ghost_path.exists() and not short_path.exists()
    assert fsck(store).problems == []


@pytest.mark.damages_store
def test_fsck_cli_prints_the_location_problem_and_fails(tmp_path, capsys):
    from ondemand_d.cli import main

    store = LocalStore(tmp_path / "s")
    _, path = _two_images(store)
    path.write_text("{}")
    assert main(["--store", str(tmp_path / "s"), "fsck"]) == 1
    out = capsys.readouterr().out
    assert f"location-record: {path}: " in out and "(affects second)" in out


@pytest.mark.damages_store
def test_a_fifo_or_a_symlink_as_location_record_is_no_location_and_no_hang(tmp_path):
    """The OPEN that locates the blob is not held by a FIFO, nor sent where a link points."""
    store = LocalStore(tmp_path)
    blob, path = _two_images(store)
    elsewhere = tmp_path / "elsewhere.json"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    got = locate(store, store.get_blob(blob.blob_id), ["second"])
    assert "remote" not in got.extra and "symbolic link" in got.extra["unlocated"]
    path.unlink()
    os.mkfifo(path)
    got = locate(store, store.get_blob(blob.blob_id), ["second"])
    assert "remote" not in got.extra and "not a regular file" in got.extra["unlocated"]
