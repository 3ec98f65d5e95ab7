# SPDX-License-Identifier: Apache-2.0
"""volume_images: each volume's mount order, kept across restarts, bounded, checked on load."""

from __future__ import annotations

import json
import os

import pytest
from structlog.testing import capture_logs

from ondemand_d import volume_images
from ondemand_d.volume_images import VolumeImages


def test_the_order_survives_a_restart(tmp_path):
    """What one instance noted, a successor loading the file knows, in the same order."""
    path = tmp_path / "v.json"
    first = VolumeImages(path)
    for volume, image in ((b"erofs,shared", "victim"), (b"erofs,shared", "attacker"),
                          (b"erofs,solo", "solo"), (b"erofs,shared", "victim")):
        first.note(volume, image)
    again = VolumeImages.load(path)
    assert again.opened(b"erofs,shared") == ("victim", "attacker")
    assert again.opened(b"erofs,solo") == ("solo",)
    assert again.opened(b"erofs,other") == ()
    assert not [p for p in tmp_path.iterdir() if p.name != "v.json"]  # no temp file left


def test_a_volume_key_that_is_not_utf8_round_trips(tmp_path):
    """Volume keys are the kernel's bytes: any of them comes back exactly."""
    path = tmp_path / "v.json"
    VolumeImages(path).note(b"erofs,\xff\xfe", "img")
    assert VolumeImages.load(path).opened(b"erofs,\xff\xfe") == ("img",)


@pytest.mark.parametrize("content", [
    b"not json",
    b"\xff\xfe",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"volumes": 5}',
    b"[]",
    b'{"volumes": [{"volume": "erofs,x", "images": ["../etc"]}]}',
    b'{"volumes": [{"volume": 7, "images": ["a"]}]}',
    b'{"volumes": [{"volume": "erofs,x", "images": "abc"}]}',
    b'{"volumes": [{"volume": "erofs,x", "images": []}]}',
    b'{"volumes": [["erofs,x", ["a"]]]}',
])
def test_a_damaged_file_explains_nothing_and_says_so(tmp_path, content):
    """Garbage, deep nesting, wrong types, bad names: nothing is taken, one log line."""
    path = tmp_path / "v.json"
    path.write_bytes(content)
    with capture_logs() as logs:
        got = VolumeImages.load(path)
    assert got.opened(b"erofs,x") == ()
    assert [e["event"] for e in logs] in (["volume_images_ignored"], ["volume_images_dropped"])


def test_only_the_sound_entries_of_a_file_are_taken(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"volumes": [
        {"volume": "erofs,bad", "images": ["ok", "no/slash"]},
        {"volume": "erofs,good", "images": ["a", "b"]},
    ]}))
    got = VolumeImages.load(path)
    assert got.opened(b"erofs,bad") == ()
    assert got.opened(b"erofs,good") == ("a", "b")


def test_a_fifo_a_symlink_or_a_giant_is_not_read(tmp_path, monkeypatch):
    """No hang on a FIFO, no following a symlink, no reading past the size cap."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real = tmp_path / "real.json"
    VolumeImages(real).note(b"erofs,x", "a")
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setattr(volume_images, "MAX_FILE_BYTES", 16)
    for path in (fifo, link, real):
        with capture_logs() as logs:
            assert VolumeImages.load(path).opened(b"erofs,x") == ()
        assert [e["event"] for e in logs] == ["volume_images_ignored"]


def test_the_bounds_keep_the_first_mounts_and_drop_whole_volumes(tmp_path):
    """Over the per-volume cap a name is not noted (the first mounts keep deciding); over
    the total, the least recently noted volume is forgotten whole (it fails closed)."""
    path = tmp_path / "v.json"
    vols = VolumeImages(path, max_names=4, max_per_volume=2)
    with capture_logs() as logs:
        for image in ("a", "b", "c"):
            vols.note(b"erofs,one", image)
        assert vols.opened(b"erofs,one") == ("a", "b")
        vols.note(b"erofs,two", "x")
        vols.note(b"erofs,three", "y")
        vols.note(b"erofs,three", "z")
    assert vols.opened(b"erofs,one") == ()
    assert vols.opened(b"erofs,two") == ("x",)
    assert vols.opened(b"erofs,three") == ("y", "z")
    assert [e["event"] for e in logs] == ["volume_images_full", "volume_images_evicted"]
    assert VolumeImages.load(path, max_names=4, max_per_volume=2).to_json() == vols.to_json()


def test_a_file_over_the_bounds_is_cut_to_them_on_load(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"volumes": [
        {"volume": f"erofs,{i}", "images": [f"i{i}", f"j{i}"]} for i in range(10)]}))
    got = VolumeImages.load(path, max_names=4)
    assert [got.opened(f"erofs,{i}".encode()) for i in (7, 8, 9)] == [(), ("i8", "j8"),
                                                                      ("i9", "j9")]


def test_a_save_that_fails_keeps_serving_from_memory(tmp_path):
    """An unwritable place is one warning; the order is still known to this instance."""
    vols = VolumeImages(tmp_path / "missing" / "v.json")
    with capture_logs() as logs:
        vols.note(b"erofs,x", "a")
    assert vols.opened(b"erofs,x") == ("a",)
    assert [e["event"] for e in logs] == ["volume_images_not_saved"]
