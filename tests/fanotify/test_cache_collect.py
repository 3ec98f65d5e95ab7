# SPDX-License-Identifier: Apache-2.0
"""The fanotify cache gives its disk back: cull, rm + gc, and fds that leave on umount."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from ondemand_d.fanotify import layout

from .conftest import Daemon, build, tree

CLI = [sys.executable, "-m", "ondemand_d"]


def make_src(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"f{i}.bin").write_bytes(rng.randbytes(300_000 + i))
    return root


def allocated(paths: list[Path]) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def fd_count(pid: int) -> int:
    """Open fds other than sockets (the control socket's connections come and go)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return sum(not link.startswith("socket:") for link in links)


def test_cull_frees_unmounted_files_and_never_a_mounted_one(daemon: Daemon,
                                                             workdir: Path) -> None:
    """`cull IMAGE` removes an unmounted image's blob files and says how many bytes; a
    mounted image's files are kept (in use) and still read back exactly; `cull --unused`
    then takes what is left unmounted."""
    srcs = {name: make_src(workdir / f"src-{name}", seed) for seed, name in
            enumerate(("gone", "kept", "idle"), start=1)}
    for name, src in srcs.items():
        build(daemon.store, src, name, "--chunk-size", "64K")
    mnts = {name: workdir / f"mnt-{name}" for name in srcs}
    files = {}
    for name in srcs:
        done = daemon.mount(name, mnts[name])
        files[name] = [Path(b["path"]) for b in done["blobs"]]
        assert tree(mnts[name]) == tree(srcs[name])
    daemon.umount(mnts["gone"])
    daemon.umount(mnts["idle"])
    held = allocated(files["gone"])
    assert held > 1_000_000  # the data was filled

    sock = ["--socket", str(daemon.socket)]
    out = subprocess.run([*CLI, "cull", "gone", "--json", *sock], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout)
    assert result["bytes_freed"] == held
    assert result["culled"] == len(files["gone"]) and result["in_use"] == 0
    assert not any(p.exists() for p in files["gone"])
    assert not (layout.root(daemon.cache) / "gone").exists()

    refused = daemon.client.post("/cull", {"image": "kept"})
    assert refused["culled"] == 0 and refused["in_use"] == len(files["kept"])
    assert all(p.exists() for p in files["kept"])

    idle = allocated(files["idle"])
    out = subprocess.run([*CLI, "cull", "--unused", *sock], capture_output=True, text=True,
                         check=True)
    assert out.stdout.splitlines()[-1].startswith(f"culled {len(files['idle'])} cache file(s)")
    assert f"; {len(files['kept'])} in use by mounted images (kept)" in out.stdout
    assert not any(p.exists() for p in files["idle"])
    assert idle > 0
    # The mounted image is whole and still served (its files were never touched).
    assert tree(mnts["kept"]) == tree(srcs["kept"])
    # A culled image mounts again and is filled afresh.
    daemon.mount("gone", mnts["gone"])
    assert tree(mnts["gone"]) == tree(srcs["gone"])


def test_rm_gc_frees_the_cache_files_of_removed_images(daemon: Daemon, workdir: Path) -> None:
    """rm + gc with the daemon running: the removed, unmounted image's blob files go and
    gc counts them; a removed image that is still mounted keeps its files (the lease)."""
    srcs = {name: make_src(workdir / f"src-{name}", seed) for seed, name in
            enumerate(("old", "busy"), start=10)}
    files = {}
    for name, src in srcs.items():
        build(daemon.store, src, name, "--chunk-size", "64K")
        mnt = workdir / f"mnt-{name}"
        files[name] = [Path(b["path"]) for b in daemon.mount(name, mnt)["blobs"]]
        assert tree(mnt) == tree(src)
    daemon.umount(workdir / "mnt-old")
    held = allocated(files["old"])
    base = [*CLI, "--store", str(daemon.store)]
    subprocess.run([*base, "rm", "old", "busy"], check=True, capture_output=True)
    out = subprocess.run([*base, "gc", "--cache-dir", str(daemon.cache), "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["cache_files"] == len(files["old"]) and report["cache_bytes"] == held
    assert list((layout.root(daemon.cache) / "old").iterdir()) == []
    assert all(p.exists() for p in files["busy"])
    assert tree(workdir / "mnt-busy") == tree(srcs["busy"])
    daemon.umount(workdir / "mnt-busy")
    out = subprocess.run([*base, "gc", "--cache-dir", str(daemon.cache)],
                         capture_output=True, text=True, check=True)
    assert "fanotify cache file(s)" in out.stdout
    assert list((layout.root(daemon.cache) / "busy").iterdir()) == []


def test_fds_flat_over_mount_umount_cycles(daemon: Daemon, workdir: Path) -> None:
    """100 mount/read/umount cycles leave the daemon's and the fd holder's fd counts where
    they were after the first: the fill fds are closed and leave the fd store on umount."""
    src = make_src(workdir / "src", seed=21)
    build(daemon.store, src, "app", "--chunk-size", "64K")
    mnt = workdir / "mnt"
    expected = (src / "f2.bin").read_bytes()

    def cycle() -> None:
        daemon.mount("app", mnt)
        assert (mnt / "f2.bin").read_bytes() == expected
        daemon.umount(mnt)
        # A readahead still filling at umount keeps its file until the fill ends (the
        # umount does not wait for it): count once the daemon has let go of every file.
        give_up = time.monotonic() + 60
        while daemon.client.get("/fanotify")["files"] and time.monotonic() < give_up:
            time.sleep(0.01)

    assert daemon.proc is not None
    holder_pid = daemon.client.get("/fanotify")["holder_pid"]
    assert holder_pid
    cycle()
    before = fd_count(daemon.proc.pid), fd_count(holder_pid)
    for _ in range(100):
        cycle()
    assert (fd_count(daemon.proc.pid), fd_count(holder_pid)) == before
    assert daemon.client.get("/fanotify")["files"] == 0
    blob_dir = str(layout.root(daemon.cache))
    for pid in (daemon.proc.pid, holder_pid):  # no blob file open, here or in the fd store
        assert not [fd for fd in os.listdir(f"/proc/{pid}/fd")
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(blob_dir)]
    daemon.mount("app", mnt)
    assert tree(mnt) == tree(src)
