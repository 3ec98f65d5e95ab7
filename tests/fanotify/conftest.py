# SPDX-License-Identifier: Apache-2.0
"""The fanotify front end on this machine's kernel: a real daemon process, real mounts.

These tests need root and a kernel with fanotify pre-content events (Linux 6.14+,
CONFIG_FANOTIFY_ACCESS_PERMISSIONS=y) and a temporary directory on a filesystem that
takes pre-content marks (ext4, xfs, btrfs). Where that is missing they fail, naming
what is missing, unless ONDEMAND_D_FANOTIFY_TESTS=skip opts out (CI does not).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ondemand_d import cli
from ondemand_d.control.client import ControlClient
from ondemand_d.fanotify import holder, layout
from ondemand_d.store.local import LocalStore

START_TIMEOUT_S = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fanotify/" in str(item.fspath):
            item.add_marker(pytest.mark.fanotify)


@pytest.fixture(autouse=True)
def _need_fanotify(fanotify_works: None) -> None:
    """Every test here needs the requirement met (a failure, not a skip, by default)."""


def build(store: Path, src: Path, name: str, *extra: str) -> None:
    assert cli.main(["--store", str(store), "build", str(src), "--name", name, *extra]) == 0


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` by relative path, with its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


class Daemon:
    """`ondemand-d serve` as a child process, with its log parsed line by line."""

    def __init__(self, workdir: Path, store: Path, *, env: dict[str, str] | None = None,
                 argv: list[str] | None = None, log_level: str = "info") -> None:
        self.workdir = workdir
        self.store = store
        self.cache = workdir / "cache"
        self.socket = workdir / "control.sock"
        self.log_path = workdir / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.argv = argv
        #: debug also logs the events of ranges already filled (info leaves them out)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return self.argv or [
            sys.executable, "-m", "ondemand_d", "--store", str(self.store), "serve",
            "--cache-dir", str(self.cache), "--control-socket", str(self.socket),
            "--log-format", "json", "--log-level", self.log_level]

    def start(self) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env)
        self.wait_ready()
        return self

    def wait_ready(self, count: int = 1) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while sum(1 for line in self.lines() if line.get("event") == "ready") < count:
            assert self.proc is None or self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "the daemon did not get ready"
            time.sleep(0.05)

    def lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for raw in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def reads(self, blob: str | None = None) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == "read_completed"
                and (blob is None or line.get("blob") == blob)]

    @property
    def client(self) -> ControlClient:
        return ControlClient(self.socket)

    def mount(self, image: str, mountpoint: Path, domain: str | None = None) -> dict[str, Any]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        return self.client.post("/fanotify/mount", {"image": image,  # type: ignore[no-any-return]
                                                    "mountpoint": str(mountpoint),
                                                    "domain": domain})

    def umount(self, mountpoint: Path, *, lazy: bool = False) -> dict[str, Any]:
        return self.client.post("/fanotify/umount",  # type: ignore[no-any-return]
                                {"mountpoint": str(mountpoint), "lazy": lazy})

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def unmount_all_under(path: Path) -> None:
    """Detach every mount under `path` (a failed test must not leave mounts behind)."""
    for mountpoint, (fstype, _) in layout.current_mounts().items():
        if mountpoint.startswith(str(path)) and fstype == "erofs":
            subprocess.run(["umount", "-l", mountpoint], check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    unmount_all_under(tmp_path)
    # A test that killed its daemon for good leaves its fd holder holding: stop it.
    holder.release(tmp_path / "cache")


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    """A running daemon over workdir/store (build images into it first or after)."""
    d = Daemon(workdir, workdir / "store")
    LocalStore(workdir / "store")
    yield d.start()
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
