# SPDX-License-Identifier: Apache-2.0
"""A store that heals and explains itself (issue 10, section 3)."""
from __future__ import annotations

import gzip
import io
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from crashlib import snapshot
from ondemand_d.cli import main
from ondemand_d.errors import DigestMismatch, ImageError, StoreError
from ondemand_d.image.build import build_image
from ondemand_d.image.source_tar import read_layers
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.importer import import_image
from ondemand_d.store.fsck import fsck
from ondemand_d.store.gc import gc
from ondemand_d.store.local import LocalStore

MiB = 1 << 20


def _tree(seed: int) -> Node:
    root = directory(mtime_ns=10**18)
    root.children[b"big"] = regular(random.Random(seed).randbytes(3 * MiB + 99), mtime_ns=10**18)
    root.children[b"small"] = regular(b"%d" % seed * 9000, mtime_ns=10**18)
    return root


def _data_chunk(store: LocalStore, name: str, index: int = 1) -> Path:
    (_, blob_id), = store.get_image(name).devices
    return store.chunk_path(store.get_blob(blob_id).chunks[index].digest)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(raw))


def _cli(store: Path, *args: str) -> int:
    return main(["--store", str(store), *args])


def test_damaged_blob_record_ls_and_build_keep_working(tmp_path, capsys) -> None:
    store = LocalStore(tmp_path / "s")
    build_image(_tree(1), store, "a")
    good = snapshot(store, "a")
    (_, blob_id), = store.get_image("a").devices
    store.blob_path(blob_id).write_bytes(b"")  # an empty record, as after a power loss
    capsys.readouterr()
    assert _cli(store.root, "ls") == 0
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "empty" in out
    build_image(_tree(2), store, "b")  # builds around it
    assert snapshot(store, "b") is not None
    report = fsck(store)
    assert [(p.kind, p.images) for p in report.problems] == [("blob-record", ("a",))]
    assert _cli(store.root, "fsck") == 1
    assert "affects a" in capsys.readouterr().out
    with pytest.raises(StoreError, match="fsck --repair"):
        gc(store)
    assert _cli(store.root, "fsck", "--repair") == 1  # quarantined, but a stays broken ...
    assert "blob-missing" in capsys.readouterr().out
    build_image(_tree(1), store, "a-again")  # ... until the same content arrives again
    assert snapshot(store, "a") == good
    assert not fsck(store).problems


def test_garbled_image_record(tmp_path, capsys) -> None:
    store = LocalStore(tmp_path / "s")
    build_image(_tree(3), store, "a")
    build_image(_tree(4), store, "b")
    (store.root / "images" / "a.json").write_bytes(b"\x00garbage{")
    assert _cli(store.root, "ls") == 0
    out = capsys.readouterr().out
    assert "damaged record" in out and "1 image(s)" in out
    build_image(_tree(5), store, "c")
    assert [(p.kind, p.images) for p in fsck(store).problems] == [("image-record", ("a",))]
    with pytest.raises(StoreError, match="damaged"):
        gc(store)
    fsck(store, repair=True)
    assert not fsck(store).problems
    gc(store)
    assert snapshot(store, "b") is not None and snapshot(store, "c") is not None


def test_damaged_chunk_is_rewritten_by_a_rebuild(tmp_path) -> None:
    """Rebuilding the same content heals the image that had the damaged chunk."""
    store = LocalStore(tmp_path / "s")
    build_image(_tree(6), store, "a")
    good = snapshot(store, "a")
    _flip(_data_chunk(store, "a"))
    with pytest.raises(DigestMismatch):
        snapshot(store, "a")
    report = build_image(_tree(6), store, "a2")
    assert report.chunks_reused == 0  # nothing taken from the damaged blob
    assert snapshot(store, "a") == good == snapshot(store, "a2")
    assert not fsck(store).problems


def test_fsck_repair_quarantines_and_the_content_comes_back(tmp_path, capsys) -> None:
    store = LocalStore(tmp_path / "s")
    build_image(_tree(7), store, "a")
    good = snapshot(store, "a")
    bad = _data_chunk(store, "a")
    _flip(bad)
    assert _cli(store.root, "fsck", "--repair") == 1  # a stays broken until its content returns
    out = capsys.readouterr().out
    assert "chunk-damaged" in out and "affects a" in out and "quarantined" in out
    assert not bad.exists() and any((store.root / "quarantine").iterdir())
    assert [p.kind for p in fsck(store).problems] == ["chunk-missing"]
    build_image(_tree(7), store, "a-again")
    assert snapshot(store, "a") == good
    assert not fsck(store).problems


def test_import_rewrites_an_empty_chunk(tmp_path) -> None:
    """A renamed-but-empty chunk (a power loss before the data hit the disk) is not trusted."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(8).randbytes(400_000))
    meta, blob = tmp_path / "m", tmp_path / "b"
    subprocess.run(["mkfs.erofs", "--chunksize=65536", f"--blobdev={blob}", str(meta), str(src)],
                   check=True, capture_output=True)
    store = LocalStore(tmp_path / "s")
    image = import_image(store, "one", meta, [(blob, "one-data")], chunk_size=64 << 10)
    path = store.chunk_path(store.get_blob(image.devices[0][1]).chunks[0].digest)
    path.chmod(0o644)
    path.write_bytes(b"")
    import_image(store, "two", meta, [(blob, "two-data")], chunk_size=64 << 10)
    served = store.resolve(b"one-data")
    assert b"".join(store.read_chunk(c) for c in served.chunks) == blob.read_bytes()


def _layer(tmp: Path, compress: str) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = random.Random(9).randbytes(200_000)
        info = tarfile.TarInfo("file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compress == "gzip":
        raw = gzip.compress(raw)
    else:
        import zstandard  # noqa: PLC0415

        raw = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    path = tmp / f"layer.{compress}"
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize(("compress", "where"), [("gzip", -6), ("gzip", -2), ("zstd", -2)])
def test_corrupt_compressed_layer_fails_the_build(tmp_path, compress, where) -> None:
    """gzip's CRC-32 and length trailer, and zstd's frame checksum, are checked."""
    path = _layer(tmp_path, compress)
    raw = bytearray(path.read_bytes())
    raw[where] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="corrupt"), read_layers([path]):
        pass


def test_import_chunk_size_above_the_cap_is_refused(tmp_path) -> None:
    store = LocalStore(tmp_path / "s")
    with pytest.raises(StoreError, match="above the store's cap"):
        import_image(store, "x", tmp_path / "nothing", [], chunk_size=8 << 20)
    assert not any((store.root / "chunks").iterdir())
