# SPDX-License-Identifier: Apache-2.0
"""The guest runner and kernel builder themselves: exit status, output, files, time limit."""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ondemand_d.guest import kernel, runner

pytestmark = pytest.mark.vm


def test_fragment_hash_ignores_comments(tmp_path: Path) -> None:
    """Editing comments in the fragment does not change the cache key (no rebuild)."""
    a, b = tmp_path / "a.config", tmp_path / "b.config"
    a.write_text("# one\nCONFIG_A=y\n# CONFIG_B is not set\n")
    b.write_text("# two\n\nCONFIG_A=y\n  # CONFIG_B is not set\n# another comment\n")
    assert kernel.fragment_hash(a) == kernel.fragment_hash(b)
    b.write_text("CONFIG_A=m\n# CONFIG_B is not set\n")
    assert kernel.fragment_hash(a) != kernel.fragment_hash(b)


def test_check_config_fails_loudly_without_ondemand(tmp_path: Path) -> None:
    """A .config that lost CACHEFILES_ONDEMAND=y is an error naming the option."""
    config = tmp_path / ".config"
    config.write_text("CONFIG_EROFS_FS_ONDEMAND=y\n# CONFIG_CACHEFILES_ONDEMAND is not set\n")
    with pytest.raises(kernel.KernelBuildError, match="CONFIG_CACHEFILES_ONDEMAND"):
        kernel.check_config(config)


def test_command_script_quotes_arguments(tmp_path: Path) -> None:
    """argv and env survive the generated shell script byte for byte."""
    argv = ["printf", "%s|", "a b", "it's", "$HOME", "*"]
    script = runner._command_script(argv, {"X": "y z'\""}, str(tmp_path))
    out = subprocess.run(["sh", "-c", script + ""], capture_output=True, text=True, check=True)
    assert out.stdout == "a b|it's|$HOME|*|"
    out = subprocess.run(["sh", "-c", script.replace("exec printf", 'printf "%s" "$X"; :')],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("y z'\"")


def test_status_output_and_files_come_back(guest: Any) -> None:
    """A guest command's exit status, stdout, stderr and result files reach the host."""
    result = guest.shell('echo out; echo err >&2; echo data > "$ODG_RESULTS/f.txt"; '
                         'test "$(id -u)" = 0 || exit 9; exit 3', timeout=90)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n"), \
        result.summary()
    assert Path("f.txt") in result.files
    assert (result.results_dir / "f.txt").read_text() == "data\n"
    assert result.boot_seconds is not None and not result.timed_out


def test_time_limit_kills_a_hung_guest(guest: Any) -> None:
    """A command that never ends is killed at the time limit and reported as timed out."""
    result = guest.shell("sleep 100000", timeout=25)
    assert result.timed_out and result.returncode is None
    assert result.seconds < 40
    with pytest.raises(runner.GuestError, match="TIMED OUT"):
        result.check()


def test_guest_runs_the_project_with_its_dependencies(guest: Any) -> None:
    """In the guest, the launch interpreter imports ondemand_d and every declared dependency."""
    from tests.unit.test_guest_launch import IMPORT_ALL

    argv = runner.ondemand_d_argv()
    result = guest.shell(f"{shlex.join([argv[0], '-c', IMPORT_ALL])} && "
                         f"{shlex.join([*argv, '--version'])}", timeout=180)
    assert result.returncode == 0, result.summary()
    imported, version = result.stdout.splitlines()
    assert "structlog" in json.loads(imported)["imported"]
    assert version.startswith("ondemand-d ")
