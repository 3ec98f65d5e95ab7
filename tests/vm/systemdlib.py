# SPDX-License-Identifier: Apache-2.0
"""Guest-side helpers for the tests that run the shipped unit under systemd (PID 1).

The unit and config are installed from ``systemd/`` exactly as its README says; the store and
the cache directory the unit names are bind mounts (the store from the results share, the cache
on the ext4 disk: cachefiles cannot bind on the overlay's tmpfs).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import ondemand_d
from ondemand_d.control.client import ControlClient

UNIT = "ondemand-d.service"
SHIPPED = Path(ondemand_d.__file__).resolve().parent.parent / "systemd"
CONTROL = Path("/run/ondemand-d/control.sock")
STORE = Path("/var/lib/ondemand-d/store")
CACHE = Path("/var/cache/ondemand-d")
DROPIN = Path("/etc/systemd/system/ondemand-d.service.d")


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def systemctl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run("systemctl", *args, check=check, timeout=timeout)


def show(*props: str) -> dict[str, str]:
    out = systemctl("show", UNIT, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid() -> int:
    return int(show("MainPID")["MainPID"])


def install(store: Path, cache: Path, settings: dict[str, str] | None = None) -> None:
    """Install the shipped unit and config as systemd/README.rst says; mount store and cache.

    ``settings``: top-level keys of the config file to change, as an operator edits it
    (``{"readahead": "0"}`` rewrites the ``readahead = ...`` line).
    """
    run("install", "-m", "644", str(SHIPPED / "ondemand-d.service"), "/etc/systemd/system/")
    run("install", "-d", "/etc/ondemand-d")
    run("install", "-m", "644", str(SHIPPED / "config.toml.example"),
        "/etc/ondemand-d/config.toml")
    config = Path("/etc/ondemand-d/config.toml")
    text = config.read_text()
    for key, value in (settings or {}).items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        assert n == 1, f"no top-level {key} in the shipped config"
    config.write_text(text)
    STORE.mkdir(parents=True, exist_ok=True)
    run("mount", "--bind", str(store), str(STORE))
    cache.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    run("mount", "--bind", str(cache), str(CACHE))
    systemctl("daemon-reload")


def dropin(name: str, text: str) -> None:
    DROPIN.mkdir(parents=True, exist_ok=True)
    (DROPIN / f"{name}.conf").write_text(text)
    systemctl("daemon-reload")


def journal(pid: int | None = None) -> list[dict[str, Any]]:
    """The daemon's JSON log lines from the journal (of one process if ``pid``)."""
    argv = ["journalctl", "-u", UNIT, "-o", "cat", "--no-pager"]
    if pid is not None:
        argv.append(f"_PID={pid}")
    out = []
    for line in run(*argv).stdout.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def events(name: str, pid: int | None = None) -> list[dict[str, Any]]:
    return [e for e in journal(pid) if e.get("event") == name]


def wait_for(pred: Any, what: str, timeout: float = 60, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_ready(old_pid: int = 0, timeout: float = 60) -> int:
    """Wait until a main process other than ``old_pid`` is up and has sent READY=1."""
    def ready() -> int:
        s = show("ActiveState", "SubState", "MainPID")
        pid = int(s["MainPID"])
        if s["ActiveState"] == "active" and s["SubState"] == "running" and pid not in (0, old_pid):
            return pid
        return 0
    return int(wait_for(ready, "ondemand-d to be active (READY=1)", timeout))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:  # reaped meanwhile
        return True


def control() -> ControlClient:
    return ControlClient(CONTROL, timeout=10)


def md5_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.md5(path.read_bytes()).hexdigest()
    return out


class Tracer:
    """The kernel's cachefiles_ondemand_* tracepoints in a private tracefs instance.

    Its clock is CLOCK_MONOTONIC, so event times compare with ``time.monotonic()``.
    """

    EVENTS = ("read", "cread", "open", "copen", "close")

    def __init__(self, name: str = "odg-test", buffer_kb: int = 16384) -> None:
        self.root = Path("/sys/kernel/tracing")
        self.dir = self.root / "instances" / name
        self.buffer_kb = buffer_kb

    def start(self) -> Tracer:
        self.dir.mkdir(exist_ok=True)
        (self.dir / "trace_clock").write_text("mono")
        (self.dir / "buffer_size_kb").write_text(str(self.buffer_kb))
        for ev in self.EVENTS:
            (self.dir / "events" / "cachefiles" / f"cachefiles_ondemand_{ev}" / "enable"
             ).write_text("1")
        return self

    def stop(self) -> list[dict[str, Any]]:
        """Disable, and return every recorded event parsed (ondemand_d's own parser)."""
        from ondemand_d.control.kjoin import parse

        for ev in self.EVENTS:
            (self.dir / "events" / "cachefiles" / f"cachefiles_ondemand_{ev}" / "enable"
             ).write_text("0")
        out = []
        for line in (self.dir / "trace").read_text().splitlines():
            rec = parse(line)
            if rec is not None:
                out.append(rec)
        overrun = [ln for ln in (self.dir / "per_cpu" / "cpu0" / "stats").read_text()
                   .splitlines() if ln.startswith("overrun")]
        self.overrun = overrun
        return out


def save_journal() -> None:
    """The whole journal into the results share (journal.txt), for a failed run's reader."""
    out = Path(os.environ.get("ODG_RESULTS", "/tmp")) / "journal.txt"
    out.write_text(run("journalctl", "-o", "short-monotonic", "--no-pager", check=False).stdout)
