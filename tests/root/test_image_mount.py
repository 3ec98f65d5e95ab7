# SPDX-License-Identifier: Apache-2.0
"""Built images mount on this kernel (loop devices, -o device=) and match their source."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondemand_d.errors import ImageError
from ondemand_d.image.build import BuildOptions, build_image
from ondemand_d.image.materialize import materialize
from ondemand_d.image.source_dir import read_directory
from ondemand_d.image.sources import open_source
from ondemand_d.image.tree import Node, directory, regular
from ondemand_d.image.xattrs import FingerprintPrefix
from ondemand_d.store import LocalStore
from tests.root.erofs_tools import diff, fsck, mounted, snapshot_dir, snapshot_tree, trees

MiB = 1 << 20
T0 = 1_700_000_000_123_456_789


def _file(
    path: Path,
    data: bytes,
    mode: int = 0o644,
    owner: tuple[int, int] = (0, 0),
    mtime_ns: int = T0,
    xattrs: dict[str, bytes] | None = None,
) -> None:
    path.write_bytes(data)
    _meta(path, mode, owner, mtime_ns, xattrs)


def _meta(
    path: Path,
    mode: int,
    owner: tuple[int, int],
    mtime_ns: int,
    xattrs: dict[str, bytes] | None = None,
) -> None:
    os.chown(path, *owner, follow_symlinks=False)
    if not path.is_symlink():
        os.chmod(path, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(path, k, v, follow_symlinks=False)
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def make_rich_tree(top: Path) -> Path:
    """Every file type and metadata kind the issue lists, on a real filesystem."""
    src = top / "src"
    src.mkdir()
    rnd = hashlib.sha256(b"seed").digest() * (6 * MiB // 32)
    _file(src / "empty", b"")
    _file(src / "tiny.txt", b"hello, erofs\n", xattrs={"user.foo": b"bar"})
    _file(src / "odd.bin", rnd[:3000], 0o600, (1000, 2000), T0 - 5)
    _file(src / "block.bin", rnd[:4096], 0o4755)
    _file(src / "big.bin", rnd[: 5 * MiB + 123], 0o640, (100000, 70000))  # extended inode
    sparse = src / "sparse.bin"
    with sparse.open("wb") as f:
        f.write(b"head")
        f.seek(40 * MiB)
        f.write(b"middle" * 1000)
        f.truncate(64 * MiB)
    _meta(sparse, 0o644, (0, 0), T0)
    _file(src / "zeros.bin", bytes(2 * MiB + 5))
    _file(src / ("L" * 255), b"long name", xattrs={"trusted.overlay.opaque": b"y"})
    _file(src / "sec", b"x" * 700, xattrs={"security.test": b"label", "user.big": b"v" * 3000})
    big_dir = src / "bigdir"
    big_dir.mkdir()
    for i in range(700):
        (big_dir / f"entry-{i:04d}-{'n' * 40}").write_bytes(b"%d" % i)
        os.utime(big_dir / f"entry-{i:04d}-{'n' * 40}", ns=(T0, T0))
    _meta(big_dir, 0o1777, (0, 0), T0 - 10**9, {"user.dir": b"1"})
    deep = src
    for i in range(40):
        deep = deep / f"d{i}"
        deep.mkdir()
    _file(deep / "bottom", b"deep")
    for p in [src / "d0", *(src / "d0").rglob("d*")]:
        if p.is_dir():
            os.utime(p, ns=(T0 - 7, T0 - 7))
    os.symlink("tiny.txt", src / "link")
    os.symlink("t" * 4000, src / "longlink")
    _meta(src / "link", 0, (5, 6), T0 - 3)
    _meta(src / "longlink", 0, (0, 0), T0)
    sub = src / "sub"
    sub.mkdir()
    _file(src / "hard1", rnd[100:9000], 0o644, (7, 8), T0, {"user.h": b"x"})
    os.link(src / "hard1", sub / "hard2")
    os.link(src / "hard1", src / "hard3")
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    os.mknod(src / "fifo", 0o644 | stat.S_IFIFO)
    os.mknod(src / "sock", 0o755 | stat.S_IFSOCK)
    for p in ("null", "blk", "fifo", "sock"):
        os.utime(src / p, ns=(T0 - 1, T0 - 1))
    os.utime(sub, ns=(T0, T0))
    os.utime(src, ns=(T0 + 1, T0 + 1))
    return src


def _build_and_compare(store: LocalStore, src: Path, name: str, tmp: Path, **kw: object) -> dict:
    report = build_image(read_directory(src), store, name, BuildOptions(**kw))  # type: ignore[arg-type]
    files = materialize(store, name, tmp / "blobs")
    if "fingerprint" not in kw:
        checked = fsck(files)
        assert checked.returncode == 0, checked.stderr
    with mounted(store, name, tmp) as mnt:
        got = snapshot_dir(mnt)
    want = snapshot_dir(src)
    if "fingerprint" in kw:
        # The visible fingerprint is extra; compare it separately.
        got = _strip(got, b"trusted.erofs.fingerprint")
    assert diff(want, got) == []
    return report.to_json()


def _strip(snap, name: bytes):  # type: ignore[no-untyped-def]
    entries = {p: (*e[:7], tuple(x for x in e[7] if x[0] != name)) for p, e in snap.entries.items()}
    return type(snap)(entries, snap.links)


def test_rich_tree_mounts_and_matches(tmp_path: Path) -> None:
    """Every file type, mode, owner, mtime, xattr namespace and hard link survives a mount."""
    src = make_rich_tree(tmp_path)
    store = LocalStore(tmp_path / "store")
    report = _build_and_compare(store, src, "rich", tmp_path)
    # Trailing zeros (sparse.bin's last 23 MiB, all of zeros.bin) stay unmapped; the
    # 39 MiB of zeros before sparse.bin's middle point at the one zero chunk.
    assert (report["holes"], report["zero_chunks"]) == (23 + 3, 39)
    assert report["new_blob"] is not None


def test_second_image_reuses_first_blob(tmp_path: Path) -> None:
    """Adding one file: one new blob with only that file's chunk; the first blob is referenced."""
    src = make_rich_tree(tmp_path)
    store = LocalStore(tmp_path / "store")
    first = _build_and_compare(store, src, "v1", tmp_path)
    (src / "added.bin").write_bytes(os.urandom(3 * MiB))
    os.utime(src, ns=(T0 + 1, T0 + 1))
    second = _build_and_compare(store, src, "v2", tmp_path)
    assert second["new_blob"] is not None and second["new_blob"] != first["new_blob"]
    assert second["blobs"] == [first["new_blob"], second["new_blob"]]
    assert second["chunks_new"] == 1  # the added file, as one chunk
    assert second["bytes_new"] == 3 * MiB
    assert second["chunks_reused"] == first["chunks_new"] + first["chunks_reused"]
    assert store.get_image("v2").devices[0] == (first["new_blob"], first["new_blob"])
    # Both images still mount side by side.
    with mounted(store, "v1", tmp_path) as a, mounted(store, "v2", tmp_path) as b:
        assert (b / "added.bin").stat().st_size == 3 * MiB
        assert not (a / "added.bin").exists()
        assert (a / "big.bin").read_bytes() == (b / "big.bin").read_bytes()


def test_fingerprint_image_mounts(tmp_path: Path) -> None:
    """--fingerprint images mount on 6.18; a visible fingerprint reads back as the image's
    own odfp2: value (fingerprint.py) on chunked files, and inline files have none."""
    from ondemand_d.image.fingerprint import check_image
    from ondemand_d.image.materialize import image_reader

    src = make_rich_tree(tmp_path)
    store = LocalStore(tmp_path / "store")
    fp = FingerprintPrefix(b"trusted.erofs.fingerprint")
    _build_and_compare(store, src, "fp", tmp_path, fingerprint=fp)
    reader = image_reader(store, "fp")
    image = store.get_image("fp")
    assert check_image(reader.primary, [store.get_blob(b) for b in image.blob_ids[1:]]).safe
    with mounted(store, "fp", tmp_path) as mnt:
        value = os.getxattr(mnt / "big.bin", "trusted.erofs.fingerprint")
        assert value == reader.lookup(b"big.bin").xattrs[b"trusted.erofs.fingerprint"]
        assert value.startswith(b"odfp2:")
        assert "trusted.erofs.fingerprint" not in os.listxattr(mnt / "tiny.txt")
        assert "trusted.erofs.fingerprint" not in os.listxattr(mnt / "empty")


def _nonempty_regular(path: Path) -> bool:
    st = path.lstat()
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def test_default_fingerprint_is_hidden_but_mounts(tmp_path: Path) -> None:
    """The erofs-utils default name (no short prefix) mounts and is hidden from userspace."""
    src = make_rich_tree(tmp_path)
    store = LocalStore(tmp_path / "store")
    _build_and_compare(store, src, "fph", tmp_path, fingerprint=FingerprintPrefix())


def test_layers_mount_like_the_merged_tree(tmp_path: Path) -> None:
    """Two layer tarballs with a whiteout and an opaque dir mount as the merged tree."""
    lower, upper, want = tmp_path / "lower", tmp_path / "upper", tmp_path / "want"
    for d in (lower, upper, want):
        (d / "etc").mkdir(parents=True)
    (lower / "etc" / "gone").write_text("x")
    (lower / "etc" / "kept").write_text("kept")
    (lower / "opq").mkdir()
    (lower / "opq" / "old").write_text("old")
    (upper / "etc" / ".wh.gone").write_text("")
    (upper / "opq").mkdir()
    (upper / "opq" / ".wh..wh..opq").write_text("")
    (upper / "opq" / "new").write_text("new")
    (want / "etc" / "kept").write_text("kept")
    (want / "opq").mkdir()
    (want / "opq" / "new").write_text("new")
    for d in (lower, upper, want):
        for p in [d, *d.rglob("*")]:
            os.utime(p, ns=(T0 // 10**9 * 10**9,) * 2)
    tars = []
    for d, mode in ((lower, "w:gz"), (upper, "w")):
        t = tmp_path / f"{d.name}.tar"
        with tarfile.open(t, mode, format=tarfile.PAX_FORMAT) as tar:
            tar.add(d, arcname=".")
        tars.append(t)
    store = LocalStore(tmp_path / "store")
    with open_source(tars) as root:
        build_image(root, store, "layers", BuildOptions())
    with mounted(store, "layers", tmp_path) as mnt:
        assert diff(snapshot_dir(want), snapshot_dir(mnt)) == []


def test_full_store_leaves_it_unchanged(tmp_path: Path) -> None:
    """ENOSPC mid-build (a 2 MiB tmpfs store) fails clearly and leaves no file behind."""
    fs = tmp_path / "tiny"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs)], check=True)
    try:
        store = LocalStore(fs / "store")
        small = directory()
        small.children[b"a"] = regular(b"a" * 5000)
        build_image(small, store, "small", BuildOptions())
        before = _files(fs / "store")
        root = directory()
        root.children[b"big"] = regular(os.urandom(4 * MiB))
        with pytest.raises(ImageError, match="full"):
            build_image(root, store, "big", BuildOptions())
        # Files only: LocalStore may leave an empty chunks/xx fan-out directory behind.
        assert _files(fs / "store") == before
        assert [i.name for i in store.images()] == ["small"]
    finally:
        subprocess.run(["umount", str(fs)], check=True)


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temporary directory 'nobody' can reach (pytest's own is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="ondemand-d-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_unreadable_file_fails_cleanly(world_tmp: Path) -> None:
    """A file the builder may not read gives an actionable error; the store is unchanged."""
    tmp_path = world_tmp
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"o" * 9000)
    (src / "secret").write_bytes(b"s" * 9000)
    (src / "secret").chmod(0)
    store_dir = tmp_path / "store"
    LocalStore(store_dir)
    subprocess.run(["chown", "-R", "65534:65534", str(store_dir)], check=True)
    before = _files(store_dir)
    # Root reads anything, so build as nobody in a forked child (the interpreter's own
    # files under /root are not readable by nobody, so no fresh python3 process).
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_fd)
        try:
            os.setgid(65534)
            os.setuid(65534)
            build_image(read_directory(src), LocalStore(store_dir), "x", BuildOptions())
            message = "built"
        except ImageError as exc:
            message = f"ImageError: {exc}"
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_fd, message.encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert message.startswith("ImageError: cannot read"), message
    assert "secret" in message and "Permission denied" in message
    assert _files(store_dir) == before


def _files(top: Path) -> list[Path]:
    """Every record and chunk file; the writer's lock file is created by any write."""
    return sorted(p for p in top.rglob("*") if not p.is_dir() and p.name not in ("lock", "format"))


# Twelve durable builds, fsck.erofs runs and loop mounts: past the 300 s hang guard on a
# loaded 2-core machine, so this one test gets a longer guard.
@pytest.mark.timeout(900)
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=trees(), hard=st.booleans())
def test_property_build_mount_compare(
    tmp_path_factory: pytest.TempPathFactory, tree: Node, hard: bool
) -> None:
    """Generated trees build, pass fsck, mount, and read back exactly."""
    tmp = tmp_path_factory.mktemp("prop")
    if hard:
        files = [c for c in tree.children.values() if not c.is_dir]
        if files:
            tree.children[b"hardlink-extra"] = files[0]
    store = LocalStore(tmp / "store")
    build_image(tree, store, "prop", BuildOptions())
    checked = fsck(materialize(store, "prop", tmp / "blobs"))
    assert checked.returncode == 0, checked.stderr
    with mounted(store, "prop", tmp) as mnt:
        assert diff(snapshot_tree(tree), snapshot_dir(mnt)) == []


def test_report_json_is_plain(tmp_path: Path) -> None:
    """The report serializes to JSON with the counters the issue names."""
    root = directory()
    root.children[b"f"] = regular(b"z" * 10000)
    r = build_image(root, LocalStore(tmp_path / "s"), "r", BuildOptions()).to_json()
    assert set(json.loads(json.dumps(r))) >= {
        "files",
        "bytes",
        "chunks_total",
        "chunks_new",
        "chunks_reused",
        "bytes_saved",
        "blobs",
    }


def test_huge_sparse_file_over_4gib(tmp_path: Path) -> None:
    """A 5 GiB sparse file needs an extended inode; its zeros cost one zero chunk."""
    src = tmp_path / "src"
    src.mkdir()
    huge = src / "huge"
    with huge.open("wb") as f:
        f.write(b"start")
        f.seek(5 << 30)
        f.write(b"the end")
    os.utime(huge, ns=(T0, T0))
    os.utime(src, ns=(T0, T0))
    store = LocalStore(tmp_path / "store")
    report = build_image(read_directory(src), store, "huge", BuildOptions())
    # Written: the first 1 MiB piece, one 1 MiB zero chunk every zero piece points at
    # (data follows, so no holes), and the 7-byte last piece padded to 4 KiB.
    assert report.new_blob_bytes == 2 * (1 << 20) + 4096 and report.holes == 0
    assert report.zero_chunks == 5 * 1024 - 1
    with mounted(store, "huge", tmp_path) as mnt, (mnt / "huge").open("rb") as f:
        assert os.fstat(f.fileno()).st_size == (5 << 30) + 7
        assert f.read(5) == b"start"
        f.seek(3 << 30)
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(5 << 30)
        assert f.read() == b"the end"


def test_three_blobs_in_device_order(tmp_path: Path) -> None:
    """An image drawing on two earlier builds' blobs plus its own mounts with three devices."""
    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore(tmp_path / "store")
    for i, name in enumerate(("one", "two", "three")):
        (src / f"file{i}").write_bytes(os.urandom(MiB + i))
        for p in (src / f"file{i}", src):
            os.utime(p, ns=(T0, T0))
        report = build_image(read_directory(src), store, name, BuildOptions())
    assert len(report.blobs) == 3 and report.chunks_new == 1
    files = materialize(store, "three", tmp_path / "blobs")
    assert fsck(files).returncode == 0
    with mounted(store, "three", tmp_path) as mnt:
        assert diff(snapshot_dir(src), snapshot_dir(mnt)) == []
