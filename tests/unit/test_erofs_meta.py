# SPDX-License-Identifier: Apache-2.0
"""erofs_meta.metadata_ranges: the blocks a bootstrap prefill writes, and nothing else.

The test of "enough": an image with every byte outside the ranges zeroed still
has the same tree (names, types, modes, owners, times, xattrs, symlink targets)
for fsck.erofs (mkfs.erofs images) and for the project's reader (built images).
The test of "no more": a big file's data blocks are not among them.
"""
from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondemand_d.erofs_meta import metadata_ranges
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.reader import ImageReader
from ondemand_d.image.tree import Node
from ondemand_d.store import LocalStore
from tests.root.erofs_tools import diff, snapshot_image, trees

BIG = 3_000_000


def _ranges(data: bytes) -> list[tuple[int, int]]:
    return metadata_ranges(lambda off, n: data[off : off + n], len(data))


def _masked(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    out = bytearray(len(data))
    for s, e in ranges:
        out[s:e] = data[s:e]
    return bytes(out)


def _tree_of(image: Path, into: Path) -> list[str]:
    subprocess.run(["fsck.erofs", f"--extract={into}", str(image)], check=True,
                   capture_output=True)
    rows = []
    for dirpath, dirnames, filenames in os.walk(into):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st_ = path.lstat()
            link = os.readlink(path) if stat.S_ISLNK(st_.st_mode) else ""
            rows.append(f"{path.relative_to(into)} {st_.st_mode:o} {int(st_.st_mtime)} {link}")
    return sorted(rows)


@pytest.fixture
def plain_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A plain mkfs.erofs image: one big file, many small ones, nested dirs, symlinks."""
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    rng = random.Random(1)
    (src / "big").write_bytes(rng.randbytes(BIG))
    for i in range(300):
        (src / "d" / f"f{i:03}").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
    for i in range(60):
        os.symlink("../" + "x" * i, src / "d" / "e" / f"link{i}")
    image = tmp_path / "plain.img"
    subprocess.run(["mkfs.erofs", str(image), str(src)], check=True, capture_output=True)
    return image, image.read_bytes()


def test_plain_image_metadata_is_enough_for_the_tree(tmp_path, plain_image):
    image, data = plain_image
    ranges = _ranges(data)
    masked = tmp_path / "masked.img"
    masked.write_bytes(_masked(data, ranges))
    assert _tree_of(masked, tmp_path / "x2") == _tree_of(image, tmp_path / "x1")


def test_plain_image_metadata_leaves_file_data_out(plain_image):
    image, data = plain_image
    ranges = _ranges(data)
    assert all(s % 4096 == 0 and e % 4096 == 0 and s < e for s, e in ranges)
    big = random.Random(1).randbytes(BIG)
    at = data.find(big[:4096])
    assert at >= 0 and at % 4096 == 0
    assert not [r for r in ranges if r[0] < at + len(big) - 4096 and at < r[1]]
    assert sum(e - s for s, e in ranges) < len(data) - BIG


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=trees(big_xattrs=6000, max_leaves=20), inline_max=st.sampled_from([0, 512, 3000]))
def test_built_image_metadata_is_enough_for_the_reader(
    tmp_path_factory: pytest.TempPathFactory, tree: Node, inline_max: int
) -> None:
    store = LocalStore(tmp_path_factory.mktemp("meta") / "store")
    build_image(tree, store, "p", BuildOptions(base_chunk=65536, inline_max=inline_max))
    image = store.get_image("p")
    boot = store.get_blob(image.bootstrap)
    primary = b"".join(store.read_chunk(c) for c in boot.chunks)
    devices = []
    for _, blob_id in image.devices:
        blob = store.get_blob(blob_id)
        whole = b"".join(store.read_chunk(c) for c in blob.chunks)
        devices.append(lambda off, n, whole=whole: whole[off : off + n])
    masked = _masked(primary, _ranges(primary))
    assert diff(snapshot_image(ImageReader(primary, devices)),
                snapshot_image(ImageReader(masked, devices))) == []


def test_not_erofs_or_out_of_range_is_refused(plain_image):
    _, data = plain_image
    with pytest.raises(ValueError, match="not an EROFS"):
        _ranges(random.Random(2).randbytes(8192))
    bad = bytearray(data)
    bad[1024 + 0x0E : 1024 + 0x10] = (0xFFFF).to_bytes(2, "little")  # root nid past the end
    with pytest.raises(ValueError, match="outside"):
        _ranges(bytes(bad[: 1 << 20]))


@pytest.mark.parametrize("opts", [["-zlz4hc"], ["-zlz4hc", "-Eztailpacking"],
                                  ["-zlz4", "-Eztailpacking", "-C65536"],
                                  ["-zlz4hc", "-Elegacy-compress"]])
def test_compressed_images_are_walked_not_prefilled_whole(tmp_path, opts):
    """lz4 images (compact or full indexes, with or without ztailpacking): the walk finds
    each compressed file's map header, indexes and inline tail, stays inside the image and
    leaves the compressed data out. It over-marked one block past each such inode and raised
    for a last inode near the image's end, and the daemon then prefilled the whole image."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = random.Random(1)
    for i in range(40):  # text compresses; its tails are inline with ztailpacking
        (src / "sub" / f"f{i}.txt").write_text(f"hello world {i}\n" * rng.randint(10, 20000))
    (src / "rand.bin").write_bytes(random.Random(2).randbytes(300_000))
    image = tmp_path / "z.img"
    subprocess.run(["mkfs.erofs", "--quiet", *opts, str(image), str(src)], check=True,
                   capture_output=True)
    data = image.read_bytes()
    ranges = _ranges(data)
    assert all(s % 4096 == 0 and e % 4096 == 0 and 0 <= s < e <= len(data) for s, e in ranges)
    assert 0 < sum(e - s for s, e in ranges) < len(data) // 4
    # Not one block of rand.bin's compressed data (stored raw: it does not compress).
    blob = random.Random(2).randbytes(300_000)
    at = data.find(blob[4096:8192])
    assert at > 0 and not [r for r in ranges if r[0] <= at < r[1]]


def test_inline_xattrs_need_no_empty_read(tmp_path: Path) -> None:
    """An inode with inline xattrs and no shared ones is walked without a 0-byte read: the
    daemon's chunk reader (fill.metadata_of) refuses those, so a fingerprinted or
    xattr-carrying image could not be mounted through the fanotify front end."""
    from ondemand_d.image.tree import directory, regular

    root = directory(mtime_ns=10**18, xattrs={b"user.a": b"1"})
    root.children[b"f"] = regular(b"x" * 9000, mtime_ns=10**18, xattrs={b"user.b": b"2"})
    store = LocalStore(tmp_path / "store")
    build_image(root, store, "x")
    boot = store.get_blob(store.get_image("x").bootstrap)
    primary = b"".join(store.read_chunk(c) for c in boot.chunks)

    def read(off: int, length: int) -> bytes:
        assert length > 0, f"empty read at {off}"
        return primary[off : off + length]

    assert metadata_ranges(read, len(primary))
