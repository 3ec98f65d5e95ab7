# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end on the 7.2 guest kernel (issue 22, item 1).

One boot of the 7.2 kind (ondemand_d.guest.kernel.KINDS["7.2"]): ``ondemand-d serve`` comes
up with the fanotify front end, an image made by ``ondemand-d build`` from a small tree is
mounted by ``ondemand-d mount`` and every file reads back with its source's md5, filled on
demand by the daemon, then ``ondemand-d umount`` takes it away. The daemon's cache dir is on
the guest's ext4 cache disk (pre-content marks need a real filesystem, not tmpfs or 9p).

/dev/cachefiles still exists on 7.2, but EROFS can no longer mount by ``fsid``
(spec/kernel-7.2.md): ``serve`` offers only the fanotify front end there and says why.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from guestlib import Daemon, guard, run_cli, tree_digests

pytestmark = [pytest.mark.vm, pytest.mark.kernel("7.2")]

EXT4_SUPER_MAGIC = 0xEF53

# ------------------------------------------------------------------ host side


@pytest.fixture(scope="module")
def checks(guest_7_2: Any) -> Any:
    return guest_7_2.checks(__file__)


def test_serve_offers_fanotify_on_7_2(checks: Any) -> None:
    """On the 7.2 kernel `serve` gets ready with the fanotify front end."""
    data = checks.passed("check_serve_frontends")
    assert data["release"].startswith("7.2"), data["release"]
    assert "fanotify" in data["ready"]["frontends"], data["ready"]


def test_serve_does_not_offer_fscache_on_7_2(checks: Any) -> None:
    """/dev/cachefiles is still there on 7.2, but EROFS cannot mount by fsid: `serve` offers
    only the fanotify front end and says why not fscache."""
    data = checks.passed("check_serve_frontends")
    assert data["cachefiles_devnode"] is True
    assert data["ready"]["frontends"] == ["fanotify"], data["ready"]
    (why,) = [e for e in data["unavailable"] if e.get("frontend") == "fscache"]
    assert "cannot mount by fsid" in why["reason"], why


def test_built_image_mounts_and_reads_byte_exact(checks: Any) -> None:
    """A built image mounts through the daemon, every file's md5 matches, and it unmounts."""
    data = checks.passed("check_mount_read_umount")
    assert data["files"] >= 40
    assert data["mismatched"] == []
    assert data["fanotify_reads"] > 0
    assert data["mounted_after_umount"] is False


# ------------------------------------------------------------------ guest side


def _tree(root: Path) -> None:
    """Small files over a few directories, one of several MiB, an empty one and a symlink."""
    rng = random.Random(72)
    for i in range(48):
        path = root / f"d{i % 4}" / f"f{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.choice([1, 100, 4096, 5000, 65_536, 200_001])))
    (root / "big.bin").write_bytes(rng.randbytes(3_000_000 + 17))
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("big.bin")




_state: dict[str, Any] = {}


def _daemon(ctx: Any) -> Daemon:
    """One daemon for the module, its store and cache dir on the ext4 cache disk."""
    if "daemon" not in _state:
        base = ctx.cache.parent / "k72"
        base.mkdir(parents=True, exist_ok=True)
        assert _fs_magic(base) == EXT4_SUPER_MAGIC, f"{base} is not on ext4"
        socket = base / "control.sock"
        daemon = Daemon(base / "store", base / "cache", ctx.out.parent / "k72-daemon.log",
                        extra=("--control-socket", str(socket)))
        _state.update(daemon=daemon.start(timeout=120), socket=socket, base=base)
    return _state["daemon"]


def _fs_magic(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding path."""
    import ctypes

    buf = ctypes.create_string_buffer(120)  # struct statfs on x86-64; f_type is its first long
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.statfs(str(path).encode(), buf) == 0, os.strerror(ctypes.get_errno())
    return int.from_bytes(buf.raw[:8], "little")


@guard(150)
def check_serve_frontends(ctx: Any) -> None:
    """Start `ondemand-d serve` and record which front ends it reports, and why not others."""
    daemon = _daemon(ctx)
    ready = daemon.events("ready")
    assert ready, daemon.log_tail()
    ctx.data["release"] = os.uname().release
    ctx.data["cachefiles_devnode"] = os.path.exists("/dev/cachefiles")
    ctx.data["ready"] = ready[0]
    ctx.data["unavailable"] = daemon.events("frontend_unavailable")
    ctx.data["warnings"] = [e for e in daemon.events() if e.get("level") in ("warning", "error")]
    ctx.data["status"] = json.loads(run_cli("status", "--socket", str(_state["socket"]), "--json"))
    assert "fanotify" in ready[0]["frontends"], ready[0]


@guard(400)
def check_mount_read_umount(ctx: Any) -> None:
    """`ondemand-d build` a tree, `mount` it, compare every file's md5, `umount`."""
    daemon = _daemon(ctx)
    src = ctx.tmp / "src"
    _tree(src)
    store = ["--store", str(daemon.store)]
    run_cli(*store, "build", str(src), "--name", "small", "--chunk-size", "64K")
    mnt = ctx.tmp / "mnt"
    mnt.mkdir()
    daemon.mark()
    run_cli(*store, "mount", "small", str(mnt), "--socket", str(_state["socket"]))
    assert os.path.ismount(mnt)
    want, got = tree_digests(src), tree_digests(mnt)
    ctx.data["files"] = len(want)
    ctx.data["mismatched"] = sorted(k for k in want.keys() | got.keys()
                                    if want.get(k) != got.get(k))
    ctx.data["link"] = os.readlink(mnt / "link")
    reads = daemon.events("read_completed")
    ctx.data["fanotify_reads"] = sum(1 for r in reads if r.get("frontend") == "fanotify")
    run_cli(*store, "umount", str(mnt), "--socket", str(_state["socket"]))
    ctx.data["mounted_after_umount"] = os.path.ismount(mnt)
    assert ctx.data["mismatched"] == [], ctx.data["mismatched"][:10]
    assert ctx.data["link"] == "big.bin"
    assert ctx.data["fanotify_reads"] > 0, daemon.log_tail()
    assert not ctx.data["mounted_after_umount"]


def teardown() -> None:
    daemon = _state.get("daemon")
    if daemon is not None:
        assert daemon.stop() == 0, daemon.log_tail()
