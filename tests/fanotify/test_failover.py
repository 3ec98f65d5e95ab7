# SPDX-License-Identifier: Apache-2.0
"""Never zeros: kill -9 of the daemon during a cold read, under an fd holder (systemd's
fd store); the successor takes over the group, the files and the mounts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from ondemand_d.store.local import LocalStore

from ..registry._proxy import Fault, FaultProxy
from ..registry._server import Registry
from .conftest import Daemon, build, tree
from .test_mount import make_tree
from .test_registry import WAIT_S, proxy, publish, registry  # noqa: F401 - fixtures

HOLDER = Path(__file__).with_name("fdholder.py")
READER = """
import sys
src, out = sys.argv[1], sys.argv[2]
with open(src, "rb", buffering=0) as f, open(out, "wb", buffering=0) as o:
    while True:
        try:
            data = f.read(256 << 10)
        except OSError as exc:
            sys.stderr.write(f"errno {exc.errno}\\n")
            sys.exit(3)
        if not data:
            break
        o.write(data)
"""


def held_daemon(workdir: Path) -> Daemon:
    # debug: the test counts the lines of events answered from what is filled
    d = Daemon(workdir, workdir / "store", log_level="debug")
    LocalStore(workdir / "store")
    d.argv = [sys.executable, str(HOLDER), str(workdir / "notify.sock"),
              str(workdir / "daemon.pid"), *d.command()]
    return d


def daemon_pid(workdir: Path) -> tuple[int, int]:
    generation, pid = (workdir / "daemon.pid").read_text().split()
    return int(generation), int(pid)


def read_all(root: Path, names: dict[str, bytes]) -> dict[str, bytes]:
    return {k: (root / k).read_bytes() for k in names}


def drop_cache(root: Path) -> None:
    """Forget the mount's page cache for every file under `root` (the next read asks again)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


async def test_kill_9_during_a_cold_read(workdir: Path, registry: Registry,  # noqa: F811
                                         proxy: FaultProxy) -> None:  # noqa: F811
    """Every byte the reader receives is correct; the successor re-adopts without refilling."""
    daemon = held_daemon(workdir)
    src = make_tree(workdir / "src", seed=21)
    await publish(src, workdir, registry, proxy, daemon.store, "app")
    await asyncio.to_thread(daemon.start)
    try:
        mnt = workdir / "mnt"
        await asyncio.to_thread(daemon.mount, "app", mnt, "apps")
        # Small files first, whole: they are filled before the kill.
        small = {k: v for k, v in tree(src).items() if k.startswith("dir")}
        assert await asyncio.to_thread(read_all, mnt, small) == small
        proxy.faults.append(Fault("delay", times=10_000, seconds=0.3))
        out = workdir / "received"
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-c", READER, str(mnt / "large.bin"), str(out),
            stderr=asyncio.subprocess.PIPE)
        before = len(daemon.reads())
        for _ in range(int(WAIT_S / 0.05)):
            if len(daemon.reads()) > before and out.exists():
                break
            await asyncio.sleep(0.05)
        generation, pid = daemon_pid(workdir)
        os.kill(pid, signal.SIGKILL)
        _, err = await asyncio.wait_for(reader.communicate(), WAIT_S * 2)
        assert daemon_pid(workdir)[0] == generation + 1
        want = (src / "large.bin").read_bytes()
        got = out.read_bytes()
        assert got == want[: len(got)]  # never a zero page where data belongs
        assert reader.returncode == 0, err  # EROFS retried what the dead instance held
        assert len(got) == len(want)
        await asyncio.to_thread(daemon.wait_ready, 2)
        # The kill landed mid-read: the successor served the same reader.
        lines_all = daemon.lines()
        (adopted,) = [i for i, r in enumerate(lines_all)
                      if r.get("event") == "fanotify_orphans_answered"]
        served = [r for r in lines_all[adopted:] if r.get("event") == "read_completed"
                  and r.get("pid") == reader.pid]
        assert lines_all[adopted]["events"] or served
        # The successor adopted the mount and the filled files: no refetch, no refill.
        st = await asyncio.to_thread(daemon.client.get, "/fanotify")
        assert st["adopted"] is True
        assert [m["mountpoint"] for m in st["mounts"]] == [str(mnt)]
        fetched = proxy.blob_bytes
        drop_cache(mnt / "dir0")
        lines = len(daemon.lines())
        dir0 = {k: v for k, v in small.items() if k.startswith("dir0/")}
        assert await asyncio.to_thread(read_all, mnt, dir0) == dir0
        assert proxy.blob_bytes == fetched
        again = [r for r in daemon.lines()[lines:] if r.get("event") == "read_completed"]
        assert again and all(r["source"] == "filled" for r in again)
        drop_cache(mnt)
        assert await asyncio.to_thread(tree, mnt) == tree(src)
    finally:
        await asyncio.to_thread(daemon.stop)  # the proxy runs on this loop: never block it
    assert not mnt.is_mount()  # a clean stop unmounts first


def test_restart_without_fd_store_readopts(daemon: Daemon, workdir: Path) -> None:
    """No fd store (the daemon and its fd holder both killed): a restarted daemon re-marks
    the files of the mounts still up and serves them again from what is filled, fetching
    nothing twice (they were filled whole: no hole could be read as zeros meanwhile)."""
    src = make_tree(workdir / "src", seed=22)
    build(daemon.store, src, "app", "--chunk-size", "64K")
    mnt = workdir / "mnt"
    daemon.mount("app", mnt)
    assert tree(mnt) == tree(src)  # everything filled, nothing pending
    holder = daemon.client.get("/fanotify")["holder_pid"]
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    os.kill(holder, signal.SIGKILL)  # ours: started by this test's daemon
    daemon.log_level = "debug"  # the lines of events answered from what is filled
    daemon.start()
    daemon.wait_ready(2)
    st = daemon.client.get("/fanotify")
    assert st["adopted"] is False
    (mount,) = st["mounts"]
    assert mount["mountpoint"] == str(mnt)
    assert all(b["filled_bytes"] == b["size"] for b in mount["blobs"])
    lines = len(daemon.lines())
    drop_cache(mnt)
    assert tree(mnt) == tree(src)
    again = [r for r in daemon.lines()[lines:] if r.get("event") == "read_completed"]
    assert again and all(r["source"] == "filled" and r["bytes"] == 0 for r in again)
