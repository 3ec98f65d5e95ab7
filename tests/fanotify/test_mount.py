# SPDX-License-Identifier: Apache-2.0
"""Mount images through the running daemon and read them back byte for byte."""

from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ondemand_d import cli
from ondemand_d.fanotify import sharing
from ondemand_d.store.local import LocalStore

from .conftest import Daemon, build, tree


def make_tree(root: Path, seed: int = 1) -> Path:
    """Small files in a few directories, one large file, a symlink and an empty file."""
    rng = random.Random(seed)
    for d in range(3):
        for i in range(12):
            path = root / f"dir{d}" / f"f{i}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
    (root / "large.bin").write_bytes(rng.randbytes(5_000_000 + 123))
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("large.bin")
    return root


def test_built_image_reads_byte_exact(daemon: Daemon, workdir: Path) -> None:
    """Every file of a built image reads back as its source; each event logs one line."""
    src = make_tree(workdir / "src")
    build(daemon.store, src, "app", "--chunk-size", "64K")
    mnt = workdir / "mnt"
    done = daemon.mount("app", mnt)
    assert done["image"] == "app"
    assert tree(mnt) == tree(src)
    assert os.readlink(mnt / "link") == "large.bin"
    reads = daemon.reads()
    assert reads, "no event was served"
    assert all(r["frontend"] == "fanotify" and r["op"] == "READ" and r["outcome"] == "ok"
               for r in reads)
    # Whole chunks were filled, each once: the bytes filled add up to at most the blobs.
    data_blobs = [b for b in done["blobs"] if b["role"] == "data"]
    filled = sum(r["bytes"] for r in daemon.lines()
                 if r.get("event") in ("read_completed", "read_ahead") and r.get("bytes"))
    assert filled <= sum(b["size"] for b in data_blobs) + done["blobs"][0]["size"]
    st = daemon.client.get("/fanotify")
    assert [m["mountpoint"] for m in st["mounts"]] == [str(mnt)]
    assert daemon.umount(mnt)["image"] == "app"
    assert not os.path.ismount(mnt)


def test_imported_images(daemon: Daemon, workdir: Path) -> None:
    """A plain mkfs.erofs image (data in the bootstrap) and a --blobdev one read back exact."""
    src = make_tree(workdir / "src", seed=2)
    plain = workdir / "plain.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(plain), str(src)], check=True)
    meta, blob = workdir / "meta.erofs", workdir / "blob.img"
    subprocess.run(["mkfs.erofs", "--quiet", f"--blobdev={blob}", "--chunksize=65536", str(meta),
                    str(src)], check=True)
    store = ["--store", str(daemon.store)]
    assert cli.main([*store, "import", str(plain), "--name", "plain"]) == 0
    assert cli.main([*store, "import", str(meta), "--name", "split",
                     "--blob", f"{blob}=splitdata"]) == 0
    for name in ("plain", "split"):
        mnt = workdir / f"mnt-{name}"
        daemon.mount(name, mnt)
        assert tree(mnt) == tree(src), name
        daemon.umount(mnt)


def test_mount_errors_are_one_sentence(daemon: Daemon, workdir: Path) -> None:
    """Unknown image, missing directory, busy mountpoint, foreign umount: clear refusals."""
    from ondemand_d.control.client import ControlUnavailable

    src = make_tree(workdir / "src")
    build(daemon.store, src, "app")
    with pytest.raises(ControlUnavailable, match="no image named 'nope'"):
        daemon.mount("nope", workdir / "m1")
    with pytest.raises(ControlUnavailable, match="not a directory"):
        daemon.client.post("/fanotify/mount", {"image": "app",
                                               "mountpoint": str(workdir / "absent")})
    daemon.mount("app", workdir / "m1")
    with pytest.raises(ControlUnavailable, match="already a mount point"):
        daemon.mount("app", workdir / "m1")
    with pytest.raises(ControlUnavailable, match="not mounted by this daemon"):
        daemon.umount(workdir / "src")
    with pytest.raises(ControlUnavailable, match="bad domain"):
        daemon.mount("app", workdir / "m2", domain="../x")
    daemon.umount(workdir / "m1")


def test_two_images_share_one_file_filled_once(daemon: Daemon, workdir: Path) -> None:
    """Images in one domain sharing a blob use one file; its chunks are each filled once."""
    src = make_tree(workdir / "src", seed=3)
    build(daemon.store, src, "base")
    (src / "extra").mkdir()
    (src / "extra" / "more.bin").write_bytes(random.Random(9).randbytes(300_000))
    build(daemon.store, src, "more")
    store = LocalStore(daemon.store)
    base, more = store.get_image("base"), store.get_image("more")
    shared = {b for _, b in base.devices} & {b for _, b in more.devices}
    assert shared, "the second build should reuse the first one's data blob"
    m1, m2 = workdir / "m1", workdir / "m2"
    daemon.mount("base", m1, domain="apps")
    daemon.mount("more", m2, domain="apps")
    expect = tree(src)
    assert tree(m2) == expect
    assert tree(m1) == {k: v for k, v in expect.items() if not k.startswith("extra/")}
    for blob_id in shared:
        assert len(list(daemon.cache.glob(f"fanotify/*/{blob_id}"))) == 1
        written = sum(r["bytes"] for r in daemon.lines()
                      if r.get("blob") == blob_id and r.get("event") in ("read_completed",
                                                                           "read_ahead"))
        assert written == store.get_blob(blob_id).size  # every chunk once, none twice


@pytest.mark.damages_store
def test_corrupt_chunk_fails_only_its_files(daemon: Daemon, workdir: Path) -> None:
    """A damaged chunk in the store: EIO for the file it holds, the others read exact."""
    src = workdir / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(4):
        (src / f"f{i}").write_bytes(rng.randbytes(3 * 65536))  # a chunk holds one file
    build(daemon.store, src, "app", "--chunk-size", "64K")
    store = LocalStore(daemon.store)
    data = store.get_blob(store.get_image("app").devices[0][1])
    victim = data.chunks[len(data.chunks) // 2]
    path = store.chunk_path(victim.digest)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    mnt = workdir / "mnt"
    daemon.mount("app", mnt)
    failed = []
    for i in range(4):
        try:
            got = (mnt / f"f{i}").read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO
            failed.append(i)
            continue
        assert got == (src / f"f{i}").read_bytes()
    assert len(failed) == 1
    assert any(r["outcome"] == "eio" for r in daemon.reads(data.blob_id))


def test_mmap_readers(daemon: Daemon, workdir: Path) -> None:
    """Pages faulted in through mmap, in random order, are the file's bytes."""
    src = make_tree(workdir / "src", seed=4)
    build(daemon.store, src, "app", "--chunk-size", "64K")
    mnt = workdir / "mnt"
    daemon.mount("app", mnt)
    want = (src / "large.bin").read_bytes()
    with (mnt / "large.bin").open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        m.madvise(mmap.MADV_RANDOM)
        pages = list(range(0, len(want), 4096))
        random.Random(1).shuffle(pages)
        for off in pages:
            assert m[off : off + 4096] == want[off : off + 4096]


def test_cli_mount_and_umount(daemon: Daemon, workdir: Path) -> None:
    """`ondemand-d mount` / `umount` through the socket: one line each; a refusal is one
    line on stderr with exit code 1."""
    src = make_tree(workdir / "src", seed=6)
    build(daemon.store, src, "app")
    mnt = workdir / "mnt"
    mnt.mkdir()
    cli_ = [sys.executable, "-m", "ondemand_d"]
    sock = ["--socket", str(daemon.socket)]
    out = subprocess.run([*cli_, "mount", "app", str(mnt), "--domain", "d", *sock],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"mounted app on {mnt} (domain d, 1 data blob(s), sharing off: "
                          f"{sharing.kernel_lacks() or 'image without fingerprints'})\n")
    assert tree(mnt) == tree(src)
    again = subprocess.run([*cli_, "mount", "app", str(mnt), *sock], capture_output=True,
                           text=True, check=False)
    assert again.returncode == 1
    assert again.stderr.startswith("ondemand-d mount: error: ") and again.stderr.count("\n") == 1
    status = subprocess.run([*cli_, "status", *sock], capture_output=True, text=True, check=True)
    assert f"  {mnt}  app (domain d)" in status.stdout
    out = subprocess.run([*cli_, "umount", str(mnt), *sock], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"unmounted app from {mnt}\n"
    assert not mnt.is_mount()
