# SPDX-License-Identifier: Apache-2.0
"""Page-cache sharing on a kernel without it (this machine, 6.x): off, said, and harmless."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ondemand_d.fanotify import sharing, syscalls

from .conftest import Daemon, build, tree


def test_probe_says_missing_here() -> None:
    """6.x EROFS rejects `inode_share` (EINVAL) but takes `directio`: the probe tells them
    apart without mounting anything."""
    assert syscalls.erofs_takes("inode_share") is False
    assert syscalls.erofs_takes("directio") is True
    sharing.reset()
    assert sharing.kernel_lacks() == sharing.KERNEL_MISSING


def test_sharing_off_kernel_option_missing(daemon: Daemon, workdir: Path) -> None:
    """Two fingerprinted images mounted in one named domain: status and the mount's log line
    say `off: kernel option missing`, the mount has no inode_share, every byte reads back."""
    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big.bin").write_bytes(hashlib.sha256(b"x").digest() * 8000)
    (src / "small.txt").write_bytes(b"hello\n")
    build(daemon.store, src, "v1", "--fingerprint")
    build(daemon.store, src, "v2", "--fingerprint")
    want = tree(src)
    for name in ("v1", "v2"):
        done = daemon.mount(name, workdir / name, domain="dom")
        assert done["sharing"] == f"off: {sharing.KERNEL_MISSING}"
        assert "inode_share" not in sharing.super_options(str(workdir / name)).split(",")
        assert tree(workdir / name) == want
    lines = [r for r in daemon.lines() if r.get("event") == "fanotify_mounted"]
    assert [r["sharing"] for r in lines] == [f"off: {sharing.KERNEL_MISSING}"] * 2
    mounts = daemon.client.get("/fanotify")["mounts"]
    assert {m["sharing"] for m in mounts} == {f"off: {sharing.KERNEL_MISSING}"}
