# SPDX-License-Identifier: Apache-2.0
"""Zero runs in built images: never a hole with data after it, one shared zero chunk (issue 13).

On the fscache path the kernel zero-fills the rest of a read request at an unmapped
chunk, so the builder may leave a chunk unmapped only when nothing but zeros follows it
in the file; other all-zero pieces point at one real zero chunk. The real-kernel proof
is tests/vm/test_zero_runs.py; this checks the image layout itself, fast.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ondemand_d.image import format as f
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.materialize import image_reader
from ondemand_d.image.reader import ImageReader
from ondemand_d.image.source_dir import read_directory
from ondemand_d.store import LocalStore

KiB, MiB = 1 << 10, 1 << 20
T = 1_600_000_000 * 10**9

#: name -> segments ("d" random data, "z" zeros, "s" a hole on disk), lengths in bytes.
FILES = {
    "z4k": [("d", 4 * KiB), ("z", 4 * KiB), ("d", 4 * KiB), ("z", 8 * KiB), ("d", 100)],
    "z4k-unaligned": [("d", 5000), ("z", 9000), ("d", 3000)],
    "z64k": [("d", 64 * KiB), ("z", 128 * KiB), ("d", 10)],
    "z1m": [("d", MiB), ("z", MiB), ("d", MiB)],
    "leading": [("z", 2 * MiB), ("d", 300 * KiB)],
    "unaligned": [("d", 3 * MiB // 2), ("z", 5 * MiB // 2), ("d", 100)],
    "trailing": [("d", MiB + 5), ("z", 3 * MiB)],
    "all-zero": [("z", 3 * MiB)],
    "sparse": [("d", 4 * KiB), ("s", 3 * MiB), ("d", 4 * KiB)],
}


def _write_tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(13)
    root.mkdir()
    want = {}
    for name, segments in FILES.items():
        path = root / name
        with path.open("wb") as out:
            for kind, length in segments:
                if kind == "s":
                    out.seek(length, 1)
                else:
                    out.write(rng.randbytes(length) if kind == "d" else bytes(length))
            out.truncate()
        os.utime(path, ns=(T, T))
        want[name] = path.read_bytes()
    os.utime(root, ns=(T, T))
    return want


def _chunk_maps(reader: ImageReader) -> dict[str, tuple[int, list[tuple[int, int]], bytes]]:
    out = {}
    for path, ino in reader.walk():
        if ino.header.datalayout == f.LAYOUT_CHUNK_BASED:
            bits, entries = reader.chunk_map(ino)
            out[path.decode().lstrip("/")] = (bits, entries, reader.read(ino))
    return out


@pytest.mark.parametrize("base", [4 * KiB, 64 * KiB, MiB], ids=["4K", "64K", "1M"])
def test_no_hole_before_data_and_one_zero_chunk(tmp_path: Path, base: int) -> None:
    """Each file reads back exactly; holes only at a file's end; zero pieces share one chunk."""
    want = _write_tree(tmp_path / "src")
    store = LocalStore(tmp_path / "store")
    report = build_image(read_directory(tmp_path / "src"), store, "z", BuildOptions(base))
    maps = _chunk_maps(image_reader(store, "z"))
    zero_targets = set()
    for name, (bits, entries, data) in maps.items():
        assert data == want[name], name
        mapped = [blkaddr != f.NULL_ADDR for _, blkaddr in entries]
        first_hole = mapped.index(False) if False in mapped else len(mapped)
        assert not any(mapped[first_hole:]), f"{name}: an unmapped chunk has data after it"
        size = 1 << bits
        for k, entry in enumerate(entries):
            piece = data[k * size : (k + 1) * size]
            if mapped[k] and not any(piece):
                zero_targets.add(entry)
    assert len(zero_targets) == 1, zero_targets  # one zero chunk, shared by every file
    assert report.zero_chunks > 0 and report.holes > 0  # the trailing runs stay holes


def test_zero_chunk_is_reused_by_a_later_build(tmp_path: Path) -> None:
    """A second image's zero pieces point at the zero chunk the first one wrote."""
    _write_tree(tmp_path / "src")
    store = LocalStore(tmp_path / "store")
    build_image(read_directory(tmp_path / "src"), store, "one", BuildOptions(MiB))
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_bytes(os.urandom(100) + bytes(2 * MiB) + os.urandom(100))
    report = build_image(read_directory(other), store, "two", BuildOptions(MiB))
    assert (report.chunks_new, report.zero_chunks) == (2, 1)  # the two data pieces only
    assert report.new_blob_bytes == MiB + 4 * KiB
    (bits, entries, data) = _chunk_maps(image_reader(store, "two"))["f"]
    assert data == (other / "f").read_bytes() and entries[1][1] != f.NULL_ADDR
