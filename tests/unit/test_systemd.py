# SPDX-License-Identifier: Apache-2.0
"""systemd.py against a real AF_UNIX datagram socket as NOTIFY_SOCKET."""
from __future__ import annotations

import os
import socket

from ondemand_d import systemd


def test_notify_and_fdstore(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        env = {"NOTIFY_SOCKET": path}
        assert systemd.notify("READY=1", environ=env)
        assert srv.recv(4096) == b"READY=1"
        r, w = os.pipe()
        assert systemd.store_fd(w, "cachefiles", environ=env)
        msg, fds, _, _ = socket.recv_fds(srv, 4096, 1)
        assert msg == b"FDSTORE=1\nFDNAME=cachefiles\nFDPOLL=0"
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(w).st_ino
        for fd in (r, w, *fds):
            os.close(fd)


def test_abstract_socket():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(f"\0ondemand-test-{os.getpid()}")
        assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": f"@ondemand-test-{os.getpid()}"})
        assert srv.recv(100) == b"STOPPING=1"


def test_no_socket_is_noop():
    assert not systemd.notify("READY=1", environ={})


def test_listen_fds():
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "cachefiles:other"}
    assert systemd.listen_fds(env) == {"cachefiles": 3, "other": 4}
    assert systemd.listen_fds({**env, "LISTEN_PID": "1"}) == {}


def test_watchdog_usec_only_for_us():
    """WATCHDOG_USEC counts only when WATCHDOG_PID is ours or unset; junk is 0."""
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "30000000"}) == 30_000_000
    own = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_usec(own) == 4_000_000
    assert systemd.watchdog_usec({**own, "WATCHDOG_PID": "1"}) == 0
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "soon"}) == 0
    assert systemd.watchdog_usec({}) == 0
