# SPDX-License-Identifier: Apache-2.0
"""Hostile config files: one ConfigError sentence (exit 3 from the CLI), never a traceback.

Python refuses to turn more than 4300 digits into an int (a ValueError from inside tomllib),
and tomllib parses nested arrays and inline tables recursively (a RecursionError).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ondemand_d.config import load
from ondemand_d.errors import ConfigError
from ondemand_d.guest.runner import ondemand_d_argv

HOSTILE = {
    "5000-digit integer": "concurrency = " + "9" * 5000,
    "5000-digit integer in [registry]": "[registry]\nconcurrency = " + "9" * 5000,
    "5000-digit size": "readahead = " + "9" * 5000,
    "deeply nested arrays": "tag = " + "[" * 100_000 + "]" * 100_000,
    "deeply nested inline tables": "tag = " + "{a=" * 5000 + "1" + "}" * 5000,
    "a table where a number goes": "concurrency = {a = 1}",
    "a list where a string goes": "tag = [1, 2]",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_config_file_is_one_config_error(name: str) -> None:
    """Each hostile file is a ConfigError naming the file, short enough to read."""
    with pytest.raises(ConfigError, match="config file") as caught:
        load(HOSTILE[name])
    assert len(str(caught.value)) < 300


def test_huge_value_in_the_environment_is_shown_cut_short() -> None:
    """A 5000-digit ONDEMAND_D_CONCURRENCY is refused with the value cut, not echoed whole."""
    with pytest.raises(ConfigError, match="ONDEMAND_D_CONCURRENCY") as caught:
        load(None, {"ONDEMAND_D_CONCURRENCY": "9" * 5000})
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("name", ["5000-digit integer", "deeply nested arrays"])
def test_cli_with_hostile_config_exits_3_with_one_line(tmp_path: Path, name: str) -> None:
    """`ondemand-d --config FILE ls`: exit 3, one line on stderr, no traceback."""
    config = tmp_path / "config.toml"
    config.write_text(HOSTILE[name])
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(tmp_path)}
    done = subprocess.run([*ondemand_d_argv(), "--config", str(config), "--store",
                           str(tmp_path / "store"), "ls"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and str(config) in lines[0]
