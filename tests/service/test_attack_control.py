# SPDX-License-Identifier: Apache-2.0
"""Attacks on the control socket of a running daemon (daemon.serve on the fake kernel)."""
from __future__ import annotations

import os
import stat

import pytest

from ondemand_d import log

from .test_control import Running


@pytest.fixture(autouse=True)
def _observed_logs():
    """Logging as `serve` configures it, so the control socket's counters see the lines."""
    log.configure("json", "warning", cache=False, observe=True)


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink", "fifo"])
async def test_control_socket_path_that_is_not_a_socket_is_left_alone(tmp_path, kind):
    """`--control-socket` naming a file (or anything but a socket) refuses it and keeps it:
    it was deleted and replaced by the socket before."""
    path = tmp_path / "ctl.sock"
    if kind == "regular file":
        path.write_bytes(b"precious\n")
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"precious\n")
    elif kind == "symlink":
        (tmp_path / "target").write_bytes(b"precious\n")
        path.symlink_to(tmp_path / "target")
    else:
        os.mkfifo(path)
    before = path.lstat()
    events: list[dict] = []
    log.observe(lambda _m, e: events.append(dict(e)))
    async with Running(tmp_path) as d:
        assert d.socket == path
        d.add_image("img", os.urandom(8192))
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        assert await d.kernel.read(obj, 0, 4096)  # the daemon serves on
    after = path.lstat()
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino,
                                                           stat.S_IFMT(before.st_mode))
    if kind in ("regular file", "symlink"):
        assert path.read_bytes() == b"precious\n"
    refused = [e for e in events if e["event"] == "control_unavailable"]
    assert refused and "not a socket" in refused[0]["error"]
