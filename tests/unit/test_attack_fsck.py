# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d fsck` (without --repair) on a store it cannot write: it reads and reports.

It took the writer lock first (open with O_CREAT, O_RDWR), so on a read-only mount or as a
user without write access it failed before checking anything.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ondemand_d.guest.runner import ondemand_d_argv
from .test_cli_errors import tree_state


def _fsck(store: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/tmp",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([*prefix, *ondemand_d_argv(), "--store", str(store), "fsck"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    (src / "b").write_bytes(b"hello\n")
    root = tmp_path / "store"
    from ondemand_d import cli  # noqa: PLC0415

    assert cli.main(["--store", str(root), "build", str(src), "--name", "app"]) == 0
    return root


def _damage_a_chunk(store: Path) -> Path:
    chunk = sorted((store / "chunks").rglob("*"))[-1]
    chunk.chmod(0o644)
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    return chunk


@pytest.mark.damages_store
def test_fsck_on_a_read_only_mount_reads_and_reports(store: Path) -> None:
    """Clean: exit 0 and "clean"; with a damaged chunk: exit 1 naming it. Nothing written."""
    (store / "lock").unlink(missing_ok=True)  # as a store copied without its lock file
    damaged = None
    for round_ in ("clean", "damaged"):
        if round_ == "damaged":
            damaged = _damage_a_chunk(store)
        subprocess.run(["mount", "--bind", str(store), str(store)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(store)], check=True)
            before = tree_state(store)
            done = _fsck(store)
            assert tree_state(store) == before
        finally:
            subprocess.run(["umount", str(store)], check=True)
        assert "Traceback" not in done.stderr
        if round_ == "clean":
            assert done.returncode == 0 and ": clean" in done.stdout, done.stderr
        else:
            assert done.returncode == 1, done.stderr
            assert f"chunk-damaged: {damaged}" in done.stdout


def test_fsck_as_a_user_who_cannot_write_the_store(store: Path) -> None:
    """`nobody` (no write permission anywhere in the store) gets a full, clean check."""
    outside = Path(tempfile.mkdtemp(prefix="fsck-ro-"))  # pytest's tmp is root-only
    try:
        outside.chmod(0o755)
        copy = outside / "store"
        subprocess.run(["cp", "-a", str(store), str(copy)], check=True)
        before = tree_state(copy)
        done = _fsck(copy, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        assert tree_state(copy) == before
    finally:
        shutil.rmtree(outside)
    assert done.returncode == 0 and ": clean" in done.stdout, done.stderr
