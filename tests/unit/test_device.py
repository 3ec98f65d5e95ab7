# SPDX-License-Identifier: Apache-2.0
"""device.py: each set-up failure becomes one actionable sentence."""
from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from ondemand_d import device as dev
from ondemand_d.errors import DeviceError


def test_missing_devnode(tmp_path):
    with pytest.raises(DeviceError, match="CONFIG_CACHEFILES_ONDEMAND=y"):
        dev.Device.open(tmp_path / "cachefiles")


def test_tmpfs_cache_dir_refused():
    if dev._fs_type(Path("/dev/shm")) != dev.TMPFS_MAGIC:
        pytest.fail("/dev/shm is expected to be tmpfs on the test machines")
    with pytest.raises(DeviceError, match="tmpfs"):
        dev.check_cache_dir(Path("/dev/shm/ondemand-d-test"))


@pytest.mark.parametrize(
    ("err", "match"),
    [
        (errno.EINVAL, "CONFIG_CACHEFILES_ONDEMAND"),
        (errno.EOPNOTSUPP, "ext4, xfs or btrfs"),
        (errno.EBUSY, "bound already"),
        (errno.EROFS, "read-only"),
    ],
)
def test_bind_errors(err, match, tmp_path):
    assert match in dev._bind_error(OSError(err, os.strerror(err)), tmp_path, "t")


def test_bind_sends_commands_in_order(tmp_path):
    """dir, tag, bind ondemand: one command per write, in order."""
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    d = dev.Device(a.fileno(), Path("fake"))
    d.bind(tmp_path / "cache", "mytag")
    assert [b.recv(100) for _ in range(3)] == [
        f"dir {tmp_path / 'cache'}".encode(), b"tag mytag", b"bind ondemand"
    ]
    assert (tmp_path / "cache").is_dir()
    a.setblocking(False)
    assert d.read_message() is None
    a.close()
    b.close()


def test_nofile_warning(monkeypatch):
    from structlog.testing import capture_logs

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 512))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: None)
    with capture_logs() as logs:
        assert dev.raise_nofile_limit() == 512
    assert logs[0]["event"] == "nofile_limit_low"


def test_adopted_device_sends_only_restore(tmp_path, monkeypatch):
    """A restarted daemon handed the bound fd by systemd writes `restore`, never dir/tag/bind."""
    import socket

    from ondemand_d import daemon, systemd
    from ondemand_d.config import load

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(systemd, "listen_fds", lambda: {"cachefiles": a.fileno()})
    cfg = load(None, {}, {"cache_dir": str(tmp_path / "cache")})
    device, adopted = daemon.open_device(cfg)
    assert adopted and device.fd == a.fileno()
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(100)  # nothing is written until start_device
    assert daemon.start_device(device, adopted).restore is True
    assert b.recv(100) == b"restore"
    with pytest.raises(BlockingIOError):
        b.recv(100)
    a.close()
    b.close()


def test_fresh_device_is_bound_and_stored(tmp_path, monkeypatch):
    """A first start binds the device, then hands it to systemd's fd store."""
    from ondemand_d import daemon, systemd
    from ondemand_d.config import load

    stored = []
    monkeypatch.setattr(systemd, "listen_fds", lambda: {})
    monkeypatch.setattr(systemd, "store_fd", lambda fd, name: stored.append(name) or True)
    cfg = load(None, {}, {"cache_dir": str(tmp_path / "cache"), "device": str(tmp_path / "nodev")})
    with pytest.raises(DeviceError):
        daemon.open_device(cfg)
    assert stored == []


def test_try_restore_tells_a_kernel_without_it(monkeypatch):
    """EOPNOTSUPP from `restore` (Linux < 6.8) is an answer, not an error; others propagate."""
    errors = iter([OSError(errno.EOPNOTSUPP, "x"), OSError(errno.EIO, "dead")])

    def refuse(self, text):
        raise next(errors)

    monkeypatch.setattr(dev.Device, "command", refuse)
    device = dev.Device(-1, Path("x"))
    assert device.try_restore() is False
    with pytest.raises(OSError, match="dead"):
        device.try_restore()


def test_start_device_without_restore_logs_once_and_serves_on():
    """An adopted device on a kernel without `restore`: one warning that says what is lost."""
    from structlog.testing import capture_logs

    from fakekernel import FakeKernel
    from ondemand_d import daemon

    kernel = FakeKernel(Path("/nonexistent"))
    kernel.restore_supported = False
    with capture_logs() as logs:
        features = daemon.start_device(kernel.device(), adopted=True)
    assert features.restore is False
    (line,) = [e for e in logs if e["event"] == "restore_unsupported"]
    assert "remount" in line["consequence"]
    assert kernel.commands == [b"restore"]
    kernel.daemon_sock.close()
    kernel.kernel_sock.close()


@pytest.mark.parametrize(("release", "domain"), [("6.12.117", True), ("6.1.0-28-amd64", True),
                                                  ("5.19.17", False), ("weird", False)])
def test_kernel_features_domain_from_release(release, domain):
    assert dev.kernel_features(True, release).domain is domain
