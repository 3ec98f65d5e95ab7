# SPDX-License-Identifier: Apache-2.0
"""The guest kernel's /dev/cachefiles and EROFS-over-fscache, driven by a minimal in-test daemon.

These prove the runner, the kernel build and the protocol bytes (spec/cachefiles-ondemand.md
sections 1-4) before any ondemand-d code is involved. One guest boot runs every check_*.
"""
from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from guestlib import (
    DEVICE, OP_CLOSE, OP_OPEN, OP_READ, MiniDaemon, Message, aligned_buffer, bind_device, errname,
    guard, mount_in_child, tree_digests, umount,
)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def checks(guest: Any) -> Any:
    return guest.checks(__file__)


def test_guest_boots_the_ondemand_kernel(checks: Any) -> None:
    """The guest runs our kernel: CACHEFILES_ONDEMAND and EROFS_FS_ONDEMAND are built in."""
    data = checks.passed("check_kernel")
    assert "CONFIG_CACHEFILES_ONDEMAND=y" in data["config"]
    assert "CONFIG_EROFS_FS_ONDEMAND=y" in data["config"]
    assert checks.result.boot_seconds is not None


def test_bind_ondemand_and_single_opener(checks: Any) -> None:
    """dir/tag/bind ondemand succeed on an ext4 dir; a second open of the device is EBUSY."""
    data = checks.passed("check_bind_and_ebusy")
    assert data["second_open"] == "EBUSY"


def test_open_message_bytes_and_failed_copen(checks: Any) -> None:
    """An fsid mount sends OPEN(volume "erofs,x\\0", cookie "x"); copen -ENOENT fails it fast.

    The errno given in copen does not reach mount(2) on 6.12: the failed lookup leaves the
    cookie without a cache object and erofs's superblock read then fails. Which errno that
    read gives depends on how far the cookie got when it began: ENOBUFS (fscache found no
    cache resources for it) or EIO; both were seen on the same kernel, in runs of one suite.
    Either way the mount fails at once (the guest check bounds it at 10 s), never hangs.
    """
    data = checks.passed("check_open_bytes_and_copen_error")
    assert data["mount"] in ("EIO", "ENOBUFS"), data


def test_minimal_daemon_serves_an_image(checks: Any) -> None:
    """A real mkfs.erofs image served by a 40-line daemon reads back byte for byte."""
    data = checks.passed("check_minimal_daemon_serves_image")
    assert data["files"] >= 4


def test_anon_fd_rejects_unaligned_write(checks: Any) -> None:
    """pwrite to an anon fd at an offset that is not page-aligned fails (ENOBUFS in 6.12)."""
    data = checks.data("check_minimal_daemon_serves_image")
    checks.passed("check_minimal_daemon_serves_image")
    assert data["unaligned_pwrite"] in ("ENOBUFS", "EINVAL"), data


# ---------------------------------------------------------------- guest side (runs as root)


@guard(20)
def check_kernel(ctx: Any) -> None:
    import gzip
    config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    ctx.data["config"] = "\n".join(line for line in config.splitlines() if "ONDEMAND" in line)
    ctx.data["uname"] = os.uname().release
    assert Path(DEVICE).exists(), f"{DEVICE} missing"
    assert os.path.ismount(os.environ["ODG_CACHE"]), "cache disk not mounted"


@guard(20)
def check_bind_and_ebusy(ctx: Any) -> None:
    fd = bind_device(ctx.cache / "fscache", "t")
    try:
        try:
            os.close(os.open(DEVICE, os.O_RDWR))
            ctx.data["second_open"] = "ok"
        except OSError as exc:
            ctx.data["second_open"] = errno.errorcode[exc.errno]
        assert (ctx.cache / "fscache" / "cache").is_dir(), "bind did not create cache/"
    finally:
        os.close(fd)


@guard(40)
def check_open_bytes_and_copen_error(ctx: Any) -> None:
    fd = bind_device(ctx.cache / "fscache", "t")
    daemon = MiniDaemon(fd, {}, fail={b"x": errno.ENOENT})
    daemon.start()
    try:
        started = time.monotonic()
        rc = mount_in_child("none", "/mnt/x", "erofs", "fsid=x", timeout=20)
        ctx.data["mount"] = errname(rc)
        ctx.data["mount_seconds"] = round(time.monotonic() - started, 3)
    finally:
        daemon.stop()
        os.close(fd)
    assert not daemon.errors, daemon.errors
    opens = [m for m in daemon.messages if m.opcode == OP_OPEN]
    ctx.data["messages"] = [m.raw.hex() for m in daemon.messages]
    assert len(opens) == 1, daemon.messages
    msg: Message = opens[0]
    assert msg.volume_key == b"erofs,x\0", msg.volume_key
    assert msg.cookie_key == b"x", msg.cookie_key
    assert msg.length == 32 + 8 + 1 == len(msg.raw)
    assert msg.flags == 0 and msg.fd > 2 and msg.object_id >= 1
    assert rc is not None, "mount hung although copen answered -ENOENT"
    assert ctx.data["mount_seconds"] < 10


def _make_tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("hello from the guest\n")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "big.bin").write_bytes(os.urandom(300_000) + b"tail")
    (root / "sub" / "page.bin").write_bytes(bytes(range(256)) * 16)
    (root / "link").symlink_to("small.txt")


@guard(60)
def check_minimal_daemon_serves_image(ctx: Any) -> None:
    src = ctx.tmp / "src"
    _make_tree(src)
    image = ctx.tmp / "img.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(src)], check=True, capture_output=True)
    fd = bind_device(ctx.cache / "fscache", "t")
    tried: dict[str, str] = {}

    def on_read(msg: Message, anon: int) -> None:
        if tried:
            return
        buf = aligned_buffer(4096)
        try:
            os.pwrite(anon, memoryview(buf)[:4096], msg.off + 512)
            tried["unaligned_pwrite"] = "ok"
        except OSError as exc:
            tried["unaligned_pwrite"] = errno.errorcode[exc.errno]

    daemon = MiniDaemon(fd, {b"img": image}, on_read=on_read)
    daemon.start()
    mnt = "/mnt/img"
    try:
        rc = mount_in_child("none", mnt, "erofs", "fsid=img", timeout=20)
        ctx.data["mount"] = errname(rc)
        assert rc == 0, f"mount failed: {errname(rc)}"
        try:
            got = tree_digests(Path(mnt))
            assert got == tree_digests(src)
            assert os.readlink(f"{mnt}/link") == "small.txt"
            ctx.data["files"] = len(got)
        finally:
            ctx.data["umount"] = errname(umount(mnt))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                m.opcode == OP_CLOSE for m in daemon.messages):
            time.sleep(0.05)
    finally:
        daemon.stop()
        os.close(fd)
    ctx.data.update(tried)
    ops = [m.opcode for m in daemon.messages]
    ctx.data["opens"], ctx.data["reads"] = ops.count(OP_OPEN), ops.count(OP_READ)
    ctx.data["closes"] = ops.count(OP_CLOSE)
    assert not daemon.errors, daemon.errors
    assert ops.count(OP_OPEN) == 1 and ops.count(OP_CLOSE) == 1, ops
    reads = [m for m in daemon.messages if m.opcode == OP_READ]
    assert all(m.off % 4096 == 0 and m.len % 4096 == 0 for m in reads), reads
