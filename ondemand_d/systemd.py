# SPDX-License-Identifier: Apache-2.0
"""A small sd_notify / fd-store / LISTEN_FDS client. A no-op when not under systemd."""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


def _address(environ: Mapping[str, str]) -> str | None:
    addr = environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    return "\0" + addr[1:] if addr.startswith("@") else addr


def notify(state: str, fds: list[int] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; return whether anyone was listening."""
    addr = _address(os.environ if environ is None else environ)
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(addr)
        if fds:
            socket.send_fds(sock, [state.encode()], fds)
        else:
            sock.sendall(state.encode())
    return True


def store_fd(fd: int, name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Keep `fd` in the service's fd store, unpolled (cachefiles uses POLLERR itself)."""
    return notify(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", [fd], environ)


def remove_fd(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Drop the fds stored as `name` from the fd store (a successor must not get them)."""
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}", None, environ)


def watchdog_usec(environ: Mapping[str, str] | None = None) -> int:
    """The watchdog period systemd armed for us in µs, or 0 (not armed, or not for us)."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    try:
        return max(0, int(env.get("WATCHDOG_USEC", "0") or 0))
    except ValueError:
        return 0


def listen_fds(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The fds systemd passed us (fd store or sockets), by name; {} if none are ours."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":")
    return {
        (names[i] if i < len(names) and names[i] else f"fd{i}"): SD_LISTEN_FDS_START + i
        for i in range(count)
    }
