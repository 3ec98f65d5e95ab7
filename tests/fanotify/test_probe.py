# SPDX-License-Identifier: Apache-2.0
"""The start-up probe: which front ends `serve` has, and why not."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from ondemand_d.fanotify.probe import probe

from .conftest import Daemon


def test_probe_refuses_tmpfs() -> None:
    """A cache directory on tmpfs takes no pre-content mark: the reason says so."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        found = probe(Path(tmp))
    assert not found.available
    assert "tmpfs" in found.reason and "ext4" in found.reason


def test_probe_works_on_this_kernel(tmp_path: Path) -> None:
    """On the test machine's disk the probe passes (the suite requires it)."""
    assert probe(tmp_path).available


def test_serve_reports_its_front_ends(daemon: Daemon, workdir: Path) -> None:
    """Without /dev/cachefiles, serve says why and runs the fanotify front end alone."""
    lines = daemon.lines()
    (ready,) = [line for line in lines if line.get("event") == "ready"]
    assert ready["frontends"] == ["fanotify"]
    (why,) = [line for line in lines if line.get("event") == "frontend_unavailable"]
    assert why["frontend"] == "fscache" and "/dev/cachefiles" in why["reason"]
    out = subprocess.run([sys.executable, "-m", "ondemand_d", "status", "--socket",
                          str(daemon.socket)], capture_output=True, text=True, check=True)
    assert "fanotify mounts (0):" in out.stdout


def test_serve_without_either_front_end_fails(tmp_path: Path) -> None:
    """No /dev/cachefiles and a tmpfs cache: exit 4 with both reasons in one sentence."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "ondemand_d", "--store", str(tmp_path / "s"), "serve",
             "--cache-dir", tmp, "--control-socket", str(tmp_path / "c.sock")],
            capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 4, out.stderr  # the device exit code
    assert "tmpfs" in out.stderr
    assert "/dev/cachefiles" in out.stderr
    assert out.stderr.count("\n") == 1
