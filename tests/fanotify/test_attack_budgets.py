# SPDX-License-Identifier: Apache-2.0
"""What an image may cost the fanotify front end: the bootstrap's metadata before mount (not
the whole file), and nothing left behind by a mount that fails."""

from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from ondemand_d import cli
from ondemand_d.control.client import ControlUnavailable
from ondemand_d.fanotify import layout
from ondemand_d.store.local import LocalStore

from .conftest import Daemon, build, tree
from .test_failover import daemon_pid, held_daemon
from .test_mount import make_tree


def allocated(path: Path, start: int = 0, end: int | None = None) -> int:
    """Bytes of `path` in [start, end) that hold data (SEEK_DATA/SEEK_HOLE: no event)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size if end is None else end
        pos, total = start, 0
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            total += max(0, pos - data)
        return total
    finally:
        os.close(fd)


def import_plain(store: Path, src: Path, image: Path, name: str) -> None:
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(src)], check=True)
    assert cli.main(["--store", str(store), "import", str(image), "--name", name,
                     "--chunk-size", "64K"]) == 0


def test_plain_image_mount_fills_only_its_metadata(daemon: Daemon, workdir: Path) -> None:
    """A plain image is its own bootstrap, data and all: the mount fills its metadata, the
    data comes by events, and every file reads back byte-exact."""
    src = make_tree(workdir / "src", seed=5)
    image = workdir / "plain.erofs"
    import_plain(daemon.store, src, image, "plain")
    mnt = workdir / "mnt"
    done = daemon.mount("plain", mnt)
    boot = Path(done["blobs"][0]["path"])
    size = image.stat().st_size
    assert os.stat(boot).st_size == size > 5_000_000
    large = (src / "large.bin").read_bytes()
    at = image.read_bytes().find(large[:65536])
    assert at > 0
    # The metadata chunks (64 KiB) are filled; the large file's data is a hole until read.
    assert 0 < allocated(boot) <= size // 4
    assert allocated(boot, at + (64 << 10), at + len(large) - (64 << 10)) == 0
    assert daemon.reads() == []  # nothing read yet: all of it was filled before mount
    assert daemon.client.get("/fanotify")["events"] == 0
    assert tree(mnt) == tree(src)
    assert os.readlink(mnt / "link") == "large.bin"
    # Counted, not read from the log: an event whose range a readahead had filled logs
    # at debug only, and here readahead may fill all the data the events ask for.
    fan = daemon.client.get("/fanotify")
    assert fan["events"] > 0, "the bootstrap's file data came by events"
    assert fan["denied"] == 0 and sum(r["count"] for r in fan["reads"]) == fan["events"]
    daemon.umount(mnt)


def corrupt_root_inode(image: Path, out: Path) -> Path:
    """The image with its root inode's data layout set to 7, which no EROFS has."""
    data = bytearray(image.read_bytes())
    root_nid, = struct.unpack_from("<H", data, 1024 + 14)
    meta_blkaddr, = struct.unpack_from("<I", data, 1024 + 40)
    at = meta_blkaddr * 4096 + root_nid * 32
    data[at] = (data[at] & 1) | (7 << 1)
    out.write_bytes(bytes(data))
    return out


def fds(pid: int) -> list[str]:
    """What the process's fds point at, but sockets (control connections come and go)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            out.append(target)
    return sorted(out)


def test_attack_failed_mount_leaves_no_file_and_no_fd(workdir: Path) -> None:
    """A bootstrap whose metadata cannot be walked is refused (not filled whole), and the
    mount takes back its files, its fds (also out of the fd store) and its lease; a good
    mount afterwards works."""
    daemon = held_daemon(workdir)
    src = make_tree(workdir / "src", seed=6)
    good = workdir / "good.erofs"
    import_plain(daemon.store, src, good, "good")
    bad = corrupt_root_inode(good, workdir / "bad.erofs")
    assert cli.main(["--store", str(daemon.store), "import", str(bad), "--name", "bad",
                     "--chunk-size", "64K"]) == 0
    daemon.start()
    try:
        _, pid = daemon_pid(workdir)
        assert daemon.proc is not None
        holder = daemon.proc.pid
        holder_fds = fds(holder)
        cache = str(layout.root(daemon.cache))
        for attempt in range(2):  # the first also opens what lives on (the lease's lock)
            daemon_fds = fds(pid)
            with pytest.raises(ControlUnavailable, match=(
                    r"the bootstrap of 'bad' is not an EROFS image whose metadata this daemon "
                    r"can find \(inode \d+: layout 7 is not understood here\).*it is not "
                    r"mounted")):
                daemon.mount("bad", workdir / "mnt-bad", domain="shared")
            domain_dir = layout.root(daemon.cache) / "shared"
            assert not domain_dir.exists() or list(domain_dir.iterdir()) == []
            assert not [f for f in fds(pid) if f.startswith(cache)]
            assert fds(holder) == holder_fds  # the fd store let go of them too
            if attempt:
                assert fds(pid) == daemon_fds
        assert not os.path.ismount(workdir / "mnt-bad")
        mnt = workdir / "mnt"
        daemon.mount("good", mnt, domain="shared")
        assert tree(mnt) == tree(src)
        daemon.umount(mnt)
    finally:
        daemon.stop()


def read_pieces(root: Path, expect: dict[str, bytes]) -> tuple[int, int]:
    """Read every file in 64 KiB pieces: each piece is its source's bytes or EIO, never
    anything else. Returns (pieces read, pieces denied)."""
    good = denied = 0
    for name, data in expect.items():
        fd = os.open(root / name, os.O_RDONLY)
        try:
            for off in range(0, max(len(data), 1), 64 << 10):
                want = data[off : off + (64 << 10)]
                got = b""
                try:
                    while len(got) < len(want):  # a short read stops where a page failed
                        more = os.pread(fd, len(want) - len(got), off + len(got))
                        assert more, f"{name} at {off + len(got)}: early end of file"
                        got += more
                except OSError as exc:
                    assert exc.errno == errno.EIO, exc
                assert got == want[: len(got)], f"{name} at {off}: wrong bytes"
                if len(got) == len(want):
                    good += 1
                else:
                    denied += 1
        finally:
            os.close(fd)
    return good, denied


def test_attack_cache_max_culls_unused_then_denies_never_zeros(workdir: Path) -> None:
    """cache_max below two images' data: reading the second after unmounting the first frees
    the first's files; with both mounted the reads past the limit get EIO, never zeros, and
    the daemon goes on serving the rest."""
    rng = random.Random(9)
    srcs = {}
    for name in ("one", "two"):
        src = workdir / f"src-{name}"
        src.mkdir()
        for i in range(6):
            (src / f"f{i}.bin").write_bytes(rng.randbytes(500_000))
        srcs[name] = src
    daemon = Daemon(workdir, workdir / "store")
    LocalStore(workdir / "store")
    for name, src in srcs.items():
        build(daemon.store, src, name, "--chunk-size", "64K")
    daemon.argv = [*daemon.command(), "--cache-max", "4M", "--readahead", "0"]
    daemon.start()
    try:
        one, two = workdir / "mnt-one", workdir / "mnt-two"
        first = daemon.mount("one", one)
        assert tree(one) == tree(srcs["one"])
        one_files = [Path(b["path"]) for b in first["blobs"]]
        daemon.umount(one)
        daemon.mount("two", two)
        assert tree(two) == tree(srcs["two"])  # room was made: the first image's files went
        assert not any(p.exists() for p in one_files)
        assert any(line.get("event") == "cache_file_removed" for line in daemon.lines())
        daemon.mount("one", one)
        good, denied = read_pieces(one, tree(srcs["one"]))
        assert denied > 0 and good > 0
        full = [line for line in daemon.lines() if line.get("event") == "cache_full"]
        assert full and full[0]["cache_max"] == 4 << 20
        assert full[0]["used"] + full[0]["need"] > 4 << 20
        eio = [r for r in daemon.reads() if r["outcome"] == "eio"]
        assert eio and all("cache full" in r["error"] for r in eio)
        assert read_pieces(two, tree(srcs["two"])) == (6 * 8, 0)  # still served, whole
        daemon.umount(one)
        daemon.umount(two)
    finally:
        daemon.stop()
