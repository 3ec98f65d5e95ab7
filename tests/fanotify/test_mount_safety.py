# SPDX-License-Identifier: Apache-2.0
"""Never root: what an image brings confers nothing (nosuid,nodev), and a mountpoint is
resolved once, with no symlink, and never a system directory or the daemon's own."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from ondemand_d.control.client import ControlUnavailable
from ondemand_d.fanotify import layout

from .conftest import Daemon, build

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def hostile_tree(root: Path) -> Path:
    """A setuid-root copy of id(1) and a device node (the null device's numbers)."""
    root.mkdir(parents=True)
    shutil.copy("/usr/bin/id", root / "id")
    os.chown(root / "id", 0, 0)
    os.chmod(root / "id", 0o4755)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return root


def flags(mountpoint: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return set(layout.mount_flags(f.read())[str(mountpoint)].split(","))


def test_setuid_file_and_device_node_confer_nothing(daemon: Daemon, workdir: Path) -> None:
    """The image's setuid-root id runs as nobody with euid 65534; its device node is dead."""
    src = hostile_tree(workdir / "src")
    build(daemon.store, src, "evil")
    mnt = workdir / "mnt"
    done = daemon.mount("evil", mnt)
    assert {"ro", "nosuid", "nodev"} <= flags(mnt)
    assert {"nosuid", "nodev"} <= set(done["options"].split(","))
    assert os.stat(mnt / "id").st_mode & stat.S_ISUID  # the bit is there: it does nothing
    os.chmod(workdir, 0o755)  # nobody may walk to the mount
    out = subprocess.run([*NOBODY, str(mnt / "id"), "-u"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "65534"
    with pytest.raises(PermissionError):
        os.open(mnt / "null", os.O_RDONLY)
    (line,) = [r for r in daemon.lines() if r.get("event") == "fanotify_mounted"]
    assert line["nosuid"] is True and "nosuid" in line["options"]
    assert daemon.client.get("/fanotify")["nosuid"] is True


def test_opt_out_is_explicit_and_said(workdir: Path) -> None:
    """mount_nosuid = false: setuid works again, and the log line and status say so."""
    d = Daemon(workdir, workdir / "store", env={"ONDEMAND_D_MOUNT_NOSUID": "false"})
    build(d.store, hostile_tree(workdir / "src"), "evil")
    d.start()
    try:
        mnt = workdir / "mnt"
        d.mount("evil", mnt)
        assert "nosuid" not in flags(mnt)
        os.chmod(workdir, 0o755)
        out = subprocess.run([*NOBODY, str(mnt / "id"), "-u"], capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == "0"  # what the opt-out means, shown once
        (line,) = [r for r in d.lines() if r.get("event") == "fanotify_mounted"]
        assert line["nosuid"] is False and "setuid" in line["warning"]
        assert d.client.get("/fanotify")["nosuid"] is False
    finally:
        d.stop()


def test_symlinked_mountpoints_are_refused(daemon: Daemon, workdir: Path) -> None:
    """A mountpoint that is a symlink, or has one on its way, is refused: nothing mounted."""
    build(daemon.store, hostile_tree(workdir / "src"), "evil")
    real = workdir / "real"
    (real / "sub").mkdir(parents=True)
    (workdir / "link").symlink_to(real)
    (workdir / "leaf").symlink_to(real / "sub")
    for path in (workdir / "link" / "sub", workdir / "leaf"):
        with pytest.raises(ControlUnavailable, match="symlink in its path"):
            daemon.client.post("/fanotify/mount", {"image": "evil", "mountpoint": str(path)})
    assert not (real / "sub").is_mount() and not real.is_mount()
    with pytest.raises(ControlUnavailable, match="not an absolute path"):
        daemon.client.post("/fanotify/mount", {"image": "evil", "mountpoint": "rel"})
    assert daemon.client.get("/fanotify")["mounts"] == []


@pytest.mark.parametrize("path", ["/", "/proc", "/proc/self", "/sys", "/dev", "/dev/shm",
                                  "/run", "/etc", "/etc/ssl", "/usr", "/usr/bin", "/boot",
                                  "/var", "/tmp", "/lib"])
def test_system_directories_are_refused(daemon: Daemon, path: str) -> None:
    """Each system directory is refused with one sentence (and /proc/PID of the daemon)."""
    if not os.path.isdir(path) or os.path.islink(path):  # /lib may be a link to usr/lib
        path = os.path.realpath(path)
    before = layout.current_mounts().get(path)  # (others' tests mount elsewhere meanwhile)
    with pytest.raises(ControlUnavailable, match="system directory"):
        daemon.client.post("/fanotify/mount", {"image": "x", "mountpoint": path})
    assert layout.current_mounts().get(path) == before


def test_daemon_proc_dir_and_own_dirs_are_refused(daemon: Daemon, workdir: Path) -> None:
    """The daemon's /proc/PID, its cache and store, and a parent of them are refused."""
    assert daemon.proc is not None
    build(daemon.store, hostile_tree(workdir / "src"), "evil")
    with pytest.raises(ControlUnavailable, match="system directory"):
        daemon.client.post("/fanotify/mount", {"image": "evil",
                                               "mountpoint": f"/proc/{daemon.proc.pid}"})
    (daemon.cache / "sub").mkdir(parents=True, exist_ok=True)
    for path in (daemon.cache, daemon.cache / "sub", daemon.store, workdir):
        with pytest.raises(ControlUnavailable, match="the daemon's own directory"):
            daemon.client.post("/fanotify/mount", {"image": "evil", "mountpoint": str(path)})
    assert daemon.client.get("/fanotify")["mounts"] == []


def test_refusal_rules() -> None:
    """The pure rule: trees, directories themselves, own directories and their parents."""
    keep = (Path("/var/cache/ondemand-d"), Path("/var/lib/ondemand-d/store"))
    assert layout.refuse_mountpoint("/run/images/app", keep) is None
    assert layout.refuse_mountpoint("/mnt", keep) is None
    assert layout.refuse_mountpoint("/var/lib/app", keep) is None
    assert layout.refuse_mountpoint("/procfoo", keep) is None
    for bad in ("/run", "/var", "/proc/1/root", "/usr/local/x", "/var/cache/ondemand-d/x",
                "/var/lib/ondemand-d"):
        assert layout.refuse_mountpoint(bad, keep) is not None, bad
