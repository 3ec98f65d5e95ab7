# SPDX-License-Identifier: Apache-2.0
"""Never zeros: crashes, restarts and mounts a successor cannot serve, without systemd.

`serve` keeps its fanotify group in its own fd holder; each scenario ends by reading
every byte of every file it can and comparing with the source: a read gives the
source's bytes or EIO, never zeros.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

from ondemand_d import cli

from ..registry._proxy import Fault, FaultProxy
from ..registry._server import Registry
from .conftest import Daemon, tree
from .test_failover import READER, drop_cache, read_all
from .test_mount import make_tree
from .test_registry import WAIT_S, proxy, publish, registry  # noqa: F401 - fixtures


def every_byte(root: Path, src: Path) -> tuple[int, int]:
    """Read every file under `root` whole; (exact, eio). Anything else fails the test."""
    exact = eio = 0
    for name, want in tree(src).items():
        try:
            got = (root / name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, (name, exc)
            eio += 1
            continue
        assert got == want, f"{name}: wrong bytes"
        exact += 1
    return exact, eio


def holder_pid(daemon: Daemon) -> int:
    pid = daemon.client.get("/fanotify")["holder_pid"]
    assert isinstance(pid, int)
    return pid


def events(daemon: Daemon, name: str) -> list[dict[str, object]]:
    return [r for r in daemon.lines() if r.get("event") == name]


async def wait_for(daemon: Daemon, name: str, count: int = 1) -> None:
    for _ in range(int(WAIT_S / 0.05)):
        if len(events(daemon, name)) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name} in the log")


async def cold_reader(daemon: Daemon, mnt: Path, out: Path) -> asyncio.subprocess.Process:
    """A reader of large.bin, once the daemon is serving its events (the registry is slow)."""
    before = len(daemon.reads())
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", READER, str(mnt / "large.bin"), str(out),
        stderr=asyncio.subprocess.PIPE)
    for _ in range(int(WAIT_S / 0.05)):
        if len(daemon.reads()) > before and out.exists():
            break
        await asyncio.sleep(0.05)
    return reader


async def test_kill_9_then_restart_by_hand(workdir: Path, registry: Registry,  # noqa: F811
                                           proxy: FaultProxy) -> None:  # noqa: F811
    """kill -9 mid cold read, no systemd: the reader waits in the holder's group and the
    successor started by hand serves it; every byte of every file is the source's."""
    daemon = Daemon(workdir, workdir / "store")
    src = make_tree(workdir / "src", seed=31)
    await publish(src, workdir, registry, proxy, daemon.store, "app")
    await asyncio.to_thread(daemon.start)
    mnt = workdir / "mnt"
    try:
        await asyncio.to_thread(daemon.mount, "app", mnt)
        holder = await asyncio.to_thread(holder_pid, daemon)
        assert daemon.proc is not None
        assert os.getsid(holder) != os.getsid(daemon.proc.pid)  # a killpg does not reach it
        proxy.faults.append(Fault("delay", times=10_000, seconds=0.3))
        out = workdir / "received"
        reader = await cold_reader(daemon, mnt, out)
        daemon.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(daemon.proc.wait)
        os.kill(holder, 0)  # the holder outlived it
        assert reader.returncode is None  # waiting, not reading zeros
        proxy.faults.clear()
        await asyncio.to_thread(daemon.start)
        await asyncio.to_thread(daemon.wait_ready, 2)
        _, err = await asyncio.wait_for(reader.communicate(), WAIT_S * 2)
        assert reader.returncode == 0, err
        assert out.read_bytes() == (src / "large.bin").read_bytes()
        st = await asyncio.to_thread(daemon.client.get, "/fanotify")
        assert st["adopted"] is True and st["holder_pid"] == holder
        assert [m["mountpoint"] for m in st["mounts"]] == [str(mnt)]
        assert st["denied_mounts"] == []
        await asyncio.to_thread(drop_cache, mnt)
        assert await asyncio.to_thread(every_byte, mnt, src) == (len(tree(src)), 0)
    finally:
        await asyncio.to_thread(daemon.stop)
    assert not mnt.is_mount()
    await asyncio.to_thread(wait_gone, holder)  # a clean stop ends the holder too


def wait_gone(pid: int) -> None:
    for _ in range(int(WAIT_S / 0.05)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        import time  # noqa: PLC0415

        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still there")


async def test_no_successor_within_the_grace(workdir: Path, registry: Registry,  # noqa: F811
                                             proxy: FaultProxy) -> None:  # noqa: F811
    """kill -9 and nobody restarts it: after holder_grace the reader gets EIO (no hang, no
    zeros), every other read is exact or EIO; a late successor serves everything again."""
    daemon = Daemon(workdir, workdir / "store", env={"ONDEMAND_D_HOLDER_GRACE": "1"})
    src = make_tree(workdir / "src", seed=32)
    await publish(src, workdir, registry, proxy, daemon.store, "app")
    await asyncio.to_thread(daemon.start)
    mnt = workdir / "mnt"
    try:
        await asyncio.to_thread(daemon.mount, "app", mnt)
        small = {k: v for k, v in tree(src).items() if k.startswith("dir0/")}
        assert await asyncio.to_thread(read_all, mnt, small) == small
        proxy.faults.append(Fault("delay", times=10_000, seconds=0.3))
        out = workdir / "received"
        reader = await cold_reader(daemon, mnt, out)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(daemon.proc.wait)
        _, err = await asyncio.wait_for(reader.communicate(), WAIT_S)
        assert reader.returncode == 3 and b"errno 5" in err  # EIO, after the grace
        got, want = out.read_bytes(), (src / "large.bin").read_bytes()
        assert got == want[: len(got)]
        await wait_for(daemon, "fd_holder_answering")
        exact, eio = await asyncio.to_thread(every_byte, mnt, src)
        assert eio > 0 and exact >= len(small)  # the unfilled: EIO; the rest: exact
        proxy.faults.clear()
        await asyncio.to_thread(daemon.start)
        await asyncio.to_thread(daemon.wait_ready, 2)
        assert events(daemon, "fd_holder_handed_over")
        await asyncio.to_thread(drop_cache, mnt)
        assert await asyncio.to_thread(every_byte, mnt, src) == (len(tree(src)), 0)
    finally:
        await asyncio.to_thread(daemon.stop)


def test_unadoptable_mount_is_denied_and_detached(workdir: Path) -> None:
    """rm + gc of a mounted image while the daemon is down: the successor cannot serve the
    mount, so a reader of it gets EIO (never zeros), it is detached, and status says why."""
    d = Daemon(workdir, workdir / "store")
    src = make_tree(workdir / "src", seed=33)
    store = ["--store", str(d.store)]
    assert cli.main([*store, "build", str(src), "--name", "app", "--chunk-size", "64K"]) == 0
    d.start()
    try:
        mnt = workdir / "mnt"
        d.mount("app", mnt)
        small = {k: v for k, v in tree(src).items() if k.startswith("dir0/")}
        assert read_all(mnt, small) == small
        held = (mnt / "large.bin").open("rb", buffering=0)  # opened, nothing read yet
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        assert cli.main([*store, "rm", "app"]) == 0
        assert cli.main([*store, "gc"]) == 0
        d.start()
        d.wait_ready(2)
        (denied,) = events(d, "fanotify_mount_denied")
        assert denied["mountpoint"] == str(mnt) and denied["detached"] is True
        assert "cannot be served" in str(denied["reason"])
        st = d.client.get("/fanotify")
        assert st["mounts"] == []
        (entry,) = st["denied_mounts"]
        assert entry["mountpoint"] == str(mnt) and entry["image"] == "app"
        assert not mnt.is_mount()  # detached: nobody opens a file there any more
        status = subprocess.run([sys.executable, "-m", "ondemand_d", "status", "--socket",
                                 str(d.socket)], capture_output=True, text=True, check=True)
        assert f"  {mnt}  app DENIED (detached): the file of blob" in status.stdout
        want = (src / "large.bin").read_bytes()
        got = b""
        try:
            while chunk := held.read(256 << 10):
                got += chunk
            raise AssertionError("read the whole file of a mount nobody serves")
        except OSError as exc:
            assert exc.errno == errno.EIO
        assert got == want[: len(got)]
        held.close()
    finally:
        d.stop()


def test_group_lost_with_holes_is_detached(workdir: Path) -> None:
    """The daemon and its holder both killed (the group is gone): a mount with holes may
    have served zeros meanwhile, so the successor detaches it and says why; a mount filled
    whole is served on."""
    d = Daemon(workdir, workdir / "store")
    src = make_tree(workdir / "src", seed=34)
    store = ["--store", str(d.store)]
    assert cli.main([*store, "build", str(src), "--name", "app", "--chunk-size", "64K"]) == 0
    d.start()
    try:
        full, holes = workdir / "full", workdir / "holes"
        d.mount("app", full, domain="a")
        d.mount("app", holes, domain="b")
        assert tree(full) == tree(src)
        holder = d.client.get("/fanotify")["holder_pid"]
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        os.kill(holder, signal.SIGKILL)
        wait_gone(holder)
        d.start()
        d.wait_ready(2)
        st = d.client.get("/fanotify")
        assert [m["mountpoint"] for m in st["mounts"]] == [str(full)]
        (entry,) = st["denied_mounts"]
        assert entry["mountpoint"] == str(holes) and entry["detached"] is True
        assert "may have been read as zeros" in entry["reason"]
        assert not holes.is_mount()
        drop_cache(full)
        assert every_byte(full, src) == (len(tree(src)), 0)
    finally:
        d.stop()


def test_mount_missing_from_the_table_is_denied(workdir: Path) -> None:
    """A damaged mounts.json: the successor still finds the mounts on its files, and
    denies and detaches them instead of leaving them readable with nobody serving."""
    d = Daemon(workdir, workdir / "store")
    src = make_tree(workdir / "src", seed=35)
    assert cli.main(["--store", str(d.store), "build", str(src), "--name", "app"]) == 0
    d.start()
    try:
        mnt = workdir / "mnt"
        d.mount("app", mnt)
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        (d.cache / "fanotify" / "mounts.json").write_text("{damaged")
        d.start()
        d.wait_ready(2)
        (entry,) = d.client.get("/fanotify")["denied_mounts"]
        assert entry["mountpoint"] == str(mnt) and "mounts.json" in entry["reason"]
        assert not mnt.is_mount()
    finally:
        d.stop()
