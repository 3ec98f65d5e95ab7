# SPDX-License-Identifier: Apache-2.0
"""The fd holder: systemd's fd store for `serve` run without systemd.

The fanotify group must outlive the daemon: when it closes, the kernel allows every
pending event and drops the marks, and readers of unfilled ranges get zeros. Under
systemd the group and the fill fds go to the service's fd store. Without it, `serve`
starts this small process of its own (own session: a kill of the daemon's process
group does not reach it), which keeps them:

* while a daemon is attached it only holds the fds (it never reads the group);
* when the daemon dies (its connection ends without ``EXIT``) the group stays open, so
  readers wait for a successor instead of reading zeros;
* after ``grace`` seconds with no successor it answers the orphaned and every new
  event itself with EIO: readers never wait forever and never get zeros;
* a successor ``ATTACH``-es, gets every fd back (LISTEN_FDS-like names) and from then
  on the holder is quiet again; on a clean stop the daemon sends ``EXIT``.

The socket is ``<cache_dir>/fanotify/holder.sock`` (0600, root's directory); each side
checks the other's SO_PEERCRED uid (the daemon sees the uid of the process that made
the socket: the first daemon, which binds it and hands it to the holder). The process imports only the standard library and
`uapi` (no event loop, no store).

    python -m ondemand_d.fanotify.holder GRACE FD   (FD: the listening socket)

Messages (one SOCK_SEQPACKET datagram each): ``STORE <name>`` + one fd, ``REMOVE
<name>``, ``ATTACH`` (answered by ``FDS <n1>:<n2>...`` + fds, at most 250 a message,
then ``END <holder pid>``, or ``BUSY``), ``EXIT``.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ondemand_d.fanotify import uapi

SOCKET = "holder.sock"
GROUP = "fanotify"
FDS_PER_MESSAGE = 250  # SCM_MAX_FD is 253
MESSAGE = 4096
ORPHAN_FD_LIMIT = 1 << 16


class HolderError(OSError):
    """The holder cannot be reached or started (the message says why)."""


def _peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the other end (SO_PEERCRED)."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _say(event: str, **fields: object) -> None:
    """One JSON line on stderr (the daemon's log, when it started us)."""
    line = {"event": event, "logger": "fd_holder", "pid": os.getpid(), **fields}
    with_newline = json.dumps(line) + "\n"
    try:
        os.write(2, with_newline.encode())
    except OSError:
        pass  # nobody reads the log any more: keep holding


# ---------------------------------------------------------------------------- process


class Holder:
    """The holder's state: the fds, the attached daemon, and when it left."""

    def __init__(self, listener: socket.socket, grace: float) -> None:
        self.listener = listener
        self.grace = grace
        self.fds: dict[str, int] = {}
        self.conn: socket.socket | None = None
        self.left: float | None = time.monotonic()  # nobody attached yet
        self.answering = False
        self.answered = 0

    def run(self) -> int:
        while True:
            if self.conn is None and not self.fds and self.left is not None and \
                    time.monotonic() - self.left >= max(self.grace, 5.0):
                _say("fd_holder_exit", reason="nothing to hold and no daemon attached")
                return 0
            watch: list[int] = [self.listener.fileno()]
            if self.conn is not None:
                watch.append(self.conn.fileno())
            group = self.fds.get(GROUP)
            if self.answering and group is not None:
                watch.append(group)
            timeout = None
            if self.conn is None and not self.answering and self.left is not None:
                timeout = max(0.0, self.left + self.grace - time.monotonic())
            try:
                ready, _, _ = select.select(watch, [], [], timeout)
            except InterruptedError:
                continue
            # The attached daemon's messages first: a successor's connect may come in the
            # same round as its predecessor's end.
            if self.conn is not None and self._drain():
                return 0
            if self.listener.fileno() in ready:
                self._accept()
            if group is not None and group in ready and self.answering:
                self._deny_pending(group)
            if self.conn is None and not self.answering and self.left is not None and \
                    time.monotonic() - self.left >= self.grace and group is not None:
                self._start_answering(group)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        _pid, uid = _peer_uid(conn)
        if uid != os.geteuid():
            conn.close()  # not the daemon's user: nothing for it here
            return
        if self.conn is not None:
            conn.send(b"BUSY")
            conn.close()
            return
        self.conn = conn

    def _drain(self) -> bool:
        """Every message the attached daemon has sent; True when the holder should exit."""
        while self.conn is not None:
            if not select.select([self.conn], [], [], 0)[0]:
                return False
            if self._message():
                return True
        return False

    def _message(self) -> bool:
        """Handle one message of the attached daemon; True when the holder should exit."""
        assert self.conn is not None
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.conn, MESSAGE, FDS_PER_MESSAGE,
                                                      socket.MSG_CMSG_CLOEXEC)
        except OSError:
            msg, fds = b"", []
        if not msg:  # the daemon died (or closed without EXIT): hold on
            for fd in fds:
                os.close(fd)
            self.conn.close()
            self.conn = None
            self.left = time.monotonic()
            _say("fd_holder_daemon_gone", fds=len(self.fds), grace_s=self.grace,
                 consequence=f"readers wait up to {self.grace} s for a successor, then get EIO")
            return False
        verb, _, name = msg.decode(errors="replace").partition(" ")
        if verb == "STORE" and fds:
            old = self.fds.pop(name, None)
            if old is not None:
                os.close(old)
            self.fds[name] = fds[0]
            fds = fds[1:]
        elif verb == "REMOVE":
            old = self.fds.pop(name, None)
            if old is not None:
                os.close(old)
        elif verb == "ATTACH":
            self._hand_over()
        elif verb == "EXIT":
            for fd in [*fds, *self.fds.values()]:
                os.close(fd)
            self.fds.clear()
            return True
        for fd in fds:
            os.close(fd)
        return False

    def _hand_over(self) -> None:
        assert self.conn is not None
        if self.answering:
            _say("fd_holder_handed_over", events_denied=self.answered)
        self.answering = False
        self.left = None
        names = list(self.fds)
        for i in range(0, len(names), FDS_PER_MESSAGE):
            part = names[i:i + FDS_PER_MESSAGE]
            socket.send_fds(self.conn, [("FDS " + ":".join(part)).encode()],
                            [self.fds[n] for n in part])
        self.conn.send(f"END {os.getpid()}".encode())

    def _start_answering(self, group: int) -> None:
        """The grace is over: deny what the dead daemon read, and from now on every event."""
        self.answering = True
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        orphans = 0
        for fd in range(min(soft if soft > 0 else ORPHAN_FD_LIMIT, ORPHAN_FD_LIMIT)):
            try:
                os.write(group, uapi.response(fd, errno.EIO))
                orphans += 1
            except OSError:
                continue
        _say("fd_holder_answering", orphans=orphans,
             consequence="no daemon came back in time: every read of an unfilled range "
             "gets EIO until one attaches")
        self._deny_pending(group)

    def _deny_pending(self, group: int) -> None:
        while True:
            try:
                buf = os.read(group, 1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                _say("fd_holder_read_failed", errno=exc.errno)
                return
            try:
                events = uapi.parse(buf)
            except uapi.FanotifyProtocolError:
                continue
            for event in events:
                if event.fd < 0:
                    continue
                try:
                    os.write(group, uapi.response(event.fd, errno.EIO))
                    self.answered += 1
                except OSError:
                    pass
                os.close(event.fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    grace, fd = float(args[0]), int(args[1])
    listener = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return Holder(listener, grace).run()


# ---------------------------------------------------------------------------- client


class HolderClient:
    """The daemon's end: store and remove fds, take them over, stop the holder.

    Args:
        sock: the connection (kept open for the daemon's life: its end is how the
            holder learns the daemon died).
        pid: the holder's process id (it says so in its answer to ATTACH).
        fds: what a previous instance left, by name.
    """

    def __init__(self, sock: socket.socket, pid: int, fds: dict[str, int]) -> None:
        self.sock = sock
        self.pid = pid
        self.fds = fds

    def store(self, fd: int, name: str) -> bool:
        socket.send_fds(self.sock, [f"STORE {name}".encode()], [fd])
        return True

    def remove(self, name: str) -> None:
        self.sock.send(f"REMOVE {name}".encode())

    def close(self, *, clean: bool) -> None:
        """Clean: the holder closes everything and exits. Else it keeps holding."""
        if clean:
            self.sock.send(b"EXIT")
        self.sock.close()


def socket_path(cache_dir: Path) -> Path:
    return cache_dir / "fanotify" / SOCKET


def attach(cache_dir: Path, grace: float, *, start: bool = True) -> HolderClient | None:
    """Connect to this cache directory's holder; start one if there is none and `start`.

    Returns:
        The attached client, or None when no holder runs and `start` is False.

    Raises:
        HolderError: the socket is not ours, or the holder could not be started.
    """
    path = socket_path(cache_dir)
    sock = _connect(path)
    if sock is None:
        if not start:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = _spawn(path, grace)
    _pid, uid = _peer_uid(sock)  # of whoever listen()ed: the daemon that started it
    if uid != os.geteuid():
        sock.close()
        msg = f"{path} is served by uid {uid}, not by this daemon's user: remove it"
        raise HolderError(errno.EPERM, msg)
    try:
        sock.send(b"ATTACH")
    except BrokenPipeError:  # it said BUSY and closed already
        pass
    fds: dict[str, int] = {}
    pid = 0
    for msg, got in _replies(sock):
        if msg.startswith(b"FDS "):
            names = msg.decode().removeprefix("FDS ").split(":")
            fds.update(zip(names, got, strict=True))
        elif msg.startswith(b"END "):
            pid = int(msg.split()[1])
        else:
            sock.close()
            text = f"another ondemand-d serve uses the fd holder of {path.parent.parent}"
            raise HolderError(errno.EBUSY, text)
    return HolderClient(sock, pid, fds)


def release(cache_dir: Path) -> int | None:
    """Stop the holder of `cache_dir` that no daemon is attached to; its pid, or None.

    What it held is closed: readers of unfilled ranges of mounts still up then read
    zeros, so detach those mounts first.
    """
    path = socket_path(cache_dir)
    sock = _connect(path)
    if sock is None:
        return None
    with sock:
        sock.send(b"ATTACH")
        pid = 0
        for msg, fds in _replies(sock):
            for fd in fds:
                os.close(fd)
            if msg.startswith(b"END "):
                pid = int(msg.split()[1])
            elif not msg.startswith(b"FDS "):
                text = "a daemon is attached to the fd holder: stop it instead"
                raise HolderError(errno.EBUSY, text)
        sock.send(b"EXIT")
        sock.recv(1)  # the holder closes its end as it exits
    return pid


def _replies(sock: socket.socket) -> Iterator[tuple[bytes, list[int]]]:
    """The holder's answer to ATTACH: FDS messages, then END <its pid> (yielded last)."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MESSAGE, FDS_PER_MESSAGE,
                                                      socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:  # it said BUSY and closed before reading ATTACH
            msg, fds = b"", []
        yield msg, fds
        if not msg.startswith(b"FDS "):
            return


def _connect(path: Path) -> socket.socket | None:
    """A connection to a live holder, or None (a stale socket file is removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        msg = f"{path} is not this daemon's holder socket: remove it"
        raise HolderError(errno.EEXIST, msg)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        path.unlink(missing_ok=True)  # a dead holder's socket
        return None
    return sock


def _env() -> dict[str, str]:
    """This environment, with this copy of ondemand_d first on the path (cwd is / there)."""
    here = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + rest if rest else "")}


def _spawn(path: Path, grace: float) -> socket.socket:
    """Bind the socket here, hand it to a new holder process, connect to it.

    Binding before the holder starts means the connect below cannot race its start-up.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(8)
    fd = listener.fileno()
    try:
        subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "ondemand_d.fanotify.holder", str(grace), str(fd)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
            pass_fds=(fd,), cwd="/", env=_env())  # cwd: keeps no directory busy
    except OSError as exc:
        listener.close()
        path.unlink(missing_ok=True)
        raise HolderError(exc.errno or errno.EIO, f"cannot start the fd holder: {exc}") from exc
    listener.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    return sock


if __name__ == "__main__":
    sys.exit(main())
