# SPDX-License-Identifier: Apache-2.0
"""Whole builds into a store: fsck.erofs accepts them, dedup, determinism, atomicity."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ondemand_d.errors import ImageError, StoreError
from ondemand_d.image.build import BuildOptions, build_image, default_epoch
from ondemand_d.image.format import BLOCK, LAYOUT_CHUNK_BASED, SB_OFFSET, Superblock
from ondemand_d.image.materialize import ImageFiles, materialize
from ondemand_d.image.tree import Node, directory, regular, symlink
from ondemand_d.store import LocalStore

MiB = 1 << 20
T = 1_600_000_000 * 10**9


def sample_tree(extra: dict[bytes, Node] | None = None) -> Node:
    """Files of every size class, a multi-block dir, links, devices, xattrs, odd ids."""
    rnd = hashlib.sha256(b"x").digest() * (3 * MiB // 32)
    root = directory(mtime_ns=T)
    shared = regular(rnd[:20000], mtime_ns=T)
    big = directory(0o700, mtime_ns=T - 1, xattrs={b"user.d": b"1"})
    big.children.update({b"f%05d" % i: regular(b"%d" % i, mtime_ns=T) for i in range(600)})
    root.children.update(
        {
            b"empty": regular(b"", mtime_ns=T),
            b"inline": regular(b"tiny", mtime_ns=T, uid=3, gid=4),
            b"odd": regular(rnd[:5000], 0o600, mtime_ns=T - 5, uid=100000, gid=200000),
            b"big": regular(rnd[: 3 * MiB], mtime_ns=T, xattrs={b"trusted.t": b"v" * 5000}),
            b"hole": regular(bytes(3 * MiB) + b"end", mtime_ns=T),
            b"a-link": symlink(b"inline", mtime_ns=T),
            b"h1": shared,
            b"h2": shared,
            b"bigdir": big,
            b"null": Node(stat.S_IFCHR, 0o666, mtime_ns=T, rdev=(1, 3)),
            b"fifo": Node(stat.S_IFIFO, 0o644, mtime_ns=T),
            b"sock": Node(stat.S_IFSOCK, 0o755, mtime_ns=T),
            b"x" * 255: regular(b"long name", mtime_ns=T),
        }
    )
    root.children.update(extra or {})
    return root


def fsck_ok(files: ImageFiles, out: Path | None = None) -> None:
    extra = [f"--extract={out}"] if out else []
    done = subprocess.run(
        ["fsck.erofs", *extra, *files.fsck_args()], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _dump(files: ImageFiles, path: str) -> dict[str, str]:
    """dump.erofs --path: its 'Key: value' pairs."""
    out = subprocess.run(
        ["dump.erofs", f"--path={path}", *files.fsck_args()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    words = out.replace(":", " : ").split()
    return {
        words[i - 1]: words[i + 1]
        for i, w in enumerate(words)
        if w == ":" and 0 < i < len(words) - 1
    }


def files_of(top: Path) -> list[Path]:
    """Every record and chunk file (not directories, not the writer's lock)."""
    return sorted(p for p in top.rglob("*") if not p.is_dir() and p.name not in ("lock", "format"))


def test_fsck_accepts_and_extracts_the_same_bytes(tmp_path: Path) -> None:
    """fsck.erofs 1.5 walks every inode and chunk; --extract gives back the source bytes."""
    store = LocalStore(tmp_path / "store")
    report = build_image(sample_tree(), store, "sample")
    files = materialize(store, "sample", tmp_path / "blobs")
    out = tmp_path / "out"
    fsck_ok(files, out)
    rnd = hashlib.sha256(b"x").digest() * (3 * MiB // 32)
    assert (out / "big").read_bytes() == rnd[: 3 * MiB]
    # The zeros before "end" point at a real zero chunk (not holes), so they extract too.
    assert (out / "hole").read_bytes() == bytes(3 * MiB) + b"end"
    assert (out / "bigdir" / "f00599").read_bytes() == b"599"
    assert os.readlink(out / "a-link") == "inline"
    # fsck 1.5 does not re-create hard links when extracting; dump.erofs shows the one inode.
    assert _dump(files, "/h1")["NID"] == _dump(files, "/h2")["NID"]
    assert _dump(files, "/h1")["Links"] == "2"
    assert report.files == 607 and report.holes == 0 and report.inline_files == 602
    assert report.zero_chunks == 3
    assert len(files.devices) == 1 and files.bootstrap.stat().st_size == report.bootstrap_bytes


def test_identical_rebuild_writes_nothing_new(tmp_path: Path) -> None:
    """The same tree again: no new blob, every chunk reused, the same bootstrap."""
    store = LocalStore(tmp_path / "store")
    first = build_image(sample_tree(), store, "one")
    second = build_image(sample_tree(), store, "two")
    assert second.new_blob is None and second.chunks_new == 0
    assert second.chunks_reused == first.chunks_new + first.chunks_reused
    assert second.bootstrap == first.bootstrap and second.blobs == first.blobs


def test_second_image_adds_one_file_and_one_chunk(tmp_path: Path) -> None:
    """One added file: one new blob holding only it; the first data blob is referenced."""
    store = LocalStore(tmp_path / "store")
    first = build_image(sample_tree(), store, "v1")
    added = os.urandom(2 * MiB + 3)
    second = build_image(sample_tree({b"zz-new": regular(added, mtime_ns=T)}), store, "v2")
    assert second.blobs == [first.new_blob, second.new_blob]
    assert (second.chunks_new, second.bytes_new) == (1, len(added))
    assert store.get_blob(second.new_blob or "").size == 2 * MiB + 4096  # padded to a block
    fsck_ok(materialize(store, "v2", tmp_path / "blobs"), tmp_path / "out")
    assert (tmp_path / "out" / "zz-new").read_bytes() == added


def test_modified_large_file_shares_unchanged_pieces(tmp_path: Path) -> None:
    """Changing one MiB of a 4 MiB file: the new build writes that piece only."""
    data = bytearray(os.urandom(4 * MiB))
    store = LocalStore(tmp_path / "store")
    build_image(_one(bytes(data)), store, "a")
    data[2 * MiB + 10] ^= 0xFF
    report = build_image(_one(bytes(data)), store, "b")
    assert (report.chunks_new, report.chunks_reused, report.bytes_new) == (1, 3, MiB)
    fsck_ok(materialize(store, "b", tmp_path / "blobs"), tmp_path / "out")
    assert (tmp_path / "out" / "f").read_bytes() == data


def _one(data: bytes) -> Node:
    root = directory(mtime_ns=T)
    root.children[b"f"] = regular(data, mtime_ns=T)
    return root


def test_deterministic_whatever_the_listing_order(tmp_path: Path) -> None:
    """Same input, two stores, children inserted in opposite orders: identical blob ids."""
    a = sample_tree()
    b = sample_tree()
    b.children = dict(reversed(list(b.children.items())))
    ra = build_image(a, LocalStore(tmp_path / "s1"), "img")
    rb = build_image(b, LocalStore(tmp_path / "s2"), "img")
    assert (ra.bootstrap, ra.blobs) == (rb.bootstrap, rb.blobs)


def test_epoch_is_source_date_epoch_or_newest_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No wall clock: SOURCE_DATE_EPOCH, else the newest mtime, lands in the superblock."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert default_epoch(sample_tree()) == (1_600_000_000, 0)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    store = LocalStore(tmp_path / "store")
    build_image(sample_tree(), store, "e")
    boot = materialize(store, "e", tmp_path / "b").bootstrap.read_bytes()
    assert Superblock.from_bytes(boot[SB_OFFSET:BLOCK]).build_time == 1234567890
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(ImageError, match="SOURCE_DATE_EPOCH"):
        default_epoch(sample_tree())


def test_many_inline_files_never_cross_blocks(tmp_path: Path) -> None:
    """Inline tails of every size near the limit stay inside one block (fsck checks)."""
    root = directory(mtime_ns=T)
    for i in range(300):
        root.children[b"f%03d" % i] = regular(bytes([65 + i % 26]) * (200 + i), mtime_ns=T + i)
    store = LocalStore(tmp_path / "store")
    build_image(root, store, "inl", BuildOptions(inline_max=600))
    fsck_ok(materialize(store, "inl", tmp_path / "b"), tmp_path / "out")
    assert (tmp_path / "out" / "f299").read_bytes() == b"N" * 499


@pytest.mark.parametrize("bad", [b"a/b", b"a\0b", b"..", b"y" * 256])
def test_bad_names_are_refused_before_writing(tmp_path: Path, bad: bytes) -> None:
    """Names with '/' or NUL (or too long) fail with a clear error and write nothing."""
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ImageError, match="name"):
        build_image(sample_tree({bad: regular(b"x")}), store, "bad")
    assert files_of(tmp_path / "store") == []


class _FailingContent:
    size = 2 * MiB

    def read(self, offset: int, length: int) -> bytes:
        raise ImageError("cannot read /src/broken: Input/output error")

    def has_data(self, offset: int, length: int) -> bool:
        return True


def test_read_error_mid_build_leaves_store_unchanged(tmp_path: Path) -> None:
    """A file failing after others were written: the error propagates, the writes are undone."""
    store = LocalStore(tmp_path / "store")
    build_image(_one(b"base" * 5000), store, "base")
    before = files_of(tmp_path / "store")
    tree = sample_tree({b"zzz": Node(stat.S_IFREG, 0o644, content=_FailingContent())})
    with pytest.raises(ImageError, match="Input/output error"):
        build_image(tree, store, "broken")
    assert files_of(tmp_path / "store") == before


class _FullStore(LocalStore):
    """Runs out of space after a few chunks, as a real full disk would."""

    budget = 3

    def put_chunk(self, data: bytes | memoryview, digest: str | None = None) -> str:
        self.budget -= 1
        if self.budget < 0:
            raise StoreError(f"store {self.root} is full while writing a chunk")
        return super().put_chunk(data, digest)


def test_full_store_is_an_image_error_and_rolled_back(tmp_path: Path) -> None:
    """ENOSPC-style failures surface as ImageError and leave no file behind."""
    store = _FullStore(tmp_path / "store")
    with pytest.raises(ImageError, match="left unchanged"):
        build_image(sample_tree(), store, "full")
    assert files_of(tmp_path / "store") == []


def test_name_clash_and_replace(tmp_path: Path) -> None:
    """An existing name needs --replace; with it the image is rebuilt."""
    store = LocalStore(tmp_path / "store")
    build_image(_one(b"1" * 9000), store, "n")
    with pytest.raises(ImageError, match="--replace"):
        build_image(_one(b"2" * 9000), store, "n")
    report = build_image(_one(b"2" * 9000), store, "n", BuildOptions(replace=True))
    assert store.get_image("n").bootstrap == report.bootstrap
    with pytest.raises(ImageError, match="bad image name"):
        build_image(_one(b""), store, "../x")


def test_dictionary_follows_the_store(tmp_path: Path) -> None:
    """Extents come from blob records: a removed data blob is no longer reused."""
    store = LocalStore(tmp_path / "store")
    first = build_image(_one(b"d" * 9000), store, "a")
    (tmp_path / "store" / "blobs" / f"{first.new_blob}.json").unlink()
    store.remove_image("a")
    again = build_image(_one(b"d" * 9000), store, "b")
    assert again.chunks_reused == 0 and again.new_blob == first.new_blob


def test_fingerprint_superblock_and_xattr(tmp_path: Path) -> None:
    """--fingerprint sets the ishare bits and stores an odfp2: chunk fingerprint (spec §8.5)."""
    from ondemand_d.image.xattrs import FingerprintPrefix

    store = LocalStore(tmp_path / "store")
    build_image(_one(b"p" * 9000), store, "fp", BuildOptions(fingerprint=FingerprintPrefix()))
    boot = materialize(store, "fp", tmp_path / "b").bootstrap.read_bytes()
    sb = Superblock.from_bytes(boot[SB_OFFSET:BLOCK])
    assert sb.feature_compat & 0x30 == 0x30 and sb.feature_incompat & 0x40
    assert (sb.xattr_prefix_count, sb.ishare_xattr_prefix_id) == (1, 0)
    at = sb.xattr_prefix_start * 4
    assert boot[at : at + 23] == bytes.fromhex("150000") + b"erofs.fingerprint.v1"
    assert b"odfp2:" in boot and b"sha256:" not in boot


def test_every_chunked_file_carries_its_fingerprint(tmp_path: Path) -> None:
    """Each chunk-based regular file (chunked, holes, hard links) has the odfp2: fingerprint
    of its chunks; inline files (data in the bootstrap) and everything else have none.

    fsck.erofs 1.5 (Debian 12's) refuses any image with long xattr prefixes ("unidentified
    incompatible feature 40"), so the kernel's check is the mount test in tests/root.
    """
    from ondemand_d.image.materialize import image_reader
    from ondemand_d.image.xattrs import FingerprintPrefix

    store = LocalStore(tmp_path / "store")
    name = b"trusted.erofs.fingerprint"
    build_image(sample_tree(), store, "fp", BuildOptions(fingerprint=FingerprintPrefix(name)))
    reader = image_reader(store, "fp")
    regular_files = 0
    for path, ino in reader.walk():
        if stat.S_ISREG(ino.mode) and ino.header.datalayout == LAYOUT_CHUNK_BASED:
            value = ino.xattrs.get(name)
            assert value is not None and value.startswith(b"odfp2:") and len(value) == 38, path
            regular_files += 1
        else:
            assert name not in ino.xattrs, path
    assert regular_files > 1
    assert reader.lookup(b"h1").xattrs[name] == reader.lookup(b"h2").xattrs[name]


def test_invalid_ids_and_targets_are_refused(tmp_path: Path) -> None:
    """(uid_t)-1, empty or NUL symlink targets cannot be represented faithfully."""
    store = LocalStore(tmp_path / "store")
    for node, message in [
        (regular(b"x", uid=2**32 - 1), "uid/gid"),
        (symlink(b""), "target of 0 bytes"),
        (symlink(b"a\0b"), "NUL"),
        (symlink(b"t" * 4096), "target of 4096 bytes"),
    ]:
        with pytest.raises(ImageError, match=message):
            build_image(sample_tree({b"bad": node}), store, "bad")
    root = directory(uid=2**32 - 1)
    with pytest.raises(ImageError, match="uid/gid"):
        build_image(root, store, "bad")
    assert files_of(tmp_path / "store") == []


@pytest.mark.parametrize(
    ("base", "store_chunk"),
    [(4096, 64 << 10), (64 << 10, 64 << 10), (256 << 10, 256 << 10), (4 * MiB, MiB)],
)
def test_store_chunks_follow_the_base_chunk_size(
    tmp_path: Path, base: int, store_chunk: int
) -> None:
    """`--chunk-size 64K` means 64 KiB store chunks (fetch units); from 64 KiB to 1 MiB."""
    store = LocalStore(tmp_path / "store")
    report = build_image(sample_tree(), store, "sample", BuildOptions(base_chunk=base))
    assert report.new_blob is not None
    chunks = store.get_blob(report.new_blob).chunks
    assert {c.length for c in chunks[:-1]} == {store_chunk}
    assert 0 < chunks[-1].length <= store_chunk
    boot = store.get_blob(report.bootstrap).chunks  # the bootstrap is prefilled whole anyway
    assert all(c.length == MiB for c in boot[:-1])
