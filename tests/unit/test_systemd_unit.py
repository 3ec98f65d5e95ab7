# SPDX-License-Identifier: Apache-2.0
"""The shipped unit (systemd/ondemand-d.service): systemd's own checks of it, and what
it must not say. The checks run systemd-analyze, which the test machines have."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ondemand-d.service"
MAX_EXPOSURE = 3.0
#: The one complaint an uninstalled unit gets: the program an install puts there.
NOT_INSTALLED = re.compile(r"Command /usr/bin/ondemand-d is not executable")


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:  # a test machine without systemd is set up wrong: say so, never skip
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def _directives(name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{name}=")]


def test_verify_is_clean_but_for_the_installed_program() -> None:
    """`systemd-analyze verify` finds nothing wrong but the absent /usr/bin/ondemand-d."""
    done = _analyze("verify", str(UNIT))
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if line.strip() and not NOT_INSTALLED.search(line)]
    assert complaints == []


def test_security_exposure_at_most_three() -> None:
    """`systemd-analyze security --offline=yes` scores the unit at most 3.0."""
    done = _analyze("security", "--offline=yes", "--no-pager", str(UNIT))
    found = re.search(r"Overall exposure level for ondemand-d\.service: (\d+\.\d+)",
                      done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


def test_no_environment_overrides_the_config_file() -> None:
    """No Environment= line: an ONDEMAND_D_* value would override config.toml."""
    assert _directives("Environment") == []
    assert _directives("EnvironmentFile") == []


def test_modprobe_runs_outside_the_sandbox() -> None:
    """The daemon has no CAP_SYS_MODULE, so modprobe must be a "+" (privileged) command;
    "-" lets a host without cachefiles start the fanotify front end."""
    modprobe = [cmd for cmd in _directives("ExecStartPre") if "modprobe" in cmd]
    assert len(modprobe) == 1
    prefix = modprobe[0].split("/", 1)[0]
    assert set(prefix) == {"-", "+"}
    assert "CAP_SYS_MODULE" not in " ".join(_directives("CapabilityBoundingSet"))


def test_the_daemon_keeps_what_it_needs() -> None:
    """Hardening never takes what serving needs: CAP_SYS_ADMIN, /dev/cachefiles, its
    directories, UNIX and IP sockets, the mount and fanotify syscalls, mount namespaces."""
    assert "CAP_SYS_ADMIN" in _directives("CapabilityBoundingSet")[0].split()
    assert "/dev/cachefiles rw" in _directives("DeviceAllow")
    assert _directives("ReadWritePaths")[0].split() == ["/var/lib/ondemand-d",
                                                        "/var/cache/ondemand-d"]
    assert _directives("RestrictAddressFamilies")[0].split() == ["AF_UNIX", "AF_INET",
                                                                 "AF_INET6"]
    allowed = [f for f in _directives("SystemCallFilter") if not f.startswith("~")]
    assert allowed and {"@mount", "fanotify_init", "fanotify_mark"} <= set(allowed[0].split())
    assert "mnt" not in " ".join(_directives("RestrictNamespaces"))
    assert _directives("PrivateDevices") == [] and _directives("PrivateNetwork") == []
