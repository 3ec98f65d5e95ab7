# SPDX-License-Identifier: Apache-2.0
"""A stand-in for systemd's fd store, for tests: run a daemon, keep the fds it stores,
and restart it with them when it dies (Restart=on-failure, FileDescriptorStoreMax=).

    python fdholder.py NOTIFY_SOCKET_PATH PIDFILE COMMAND...

The daemon sends ``FDSTORE=1`` / ``FDNAME=`` datagrams with fds over NOTIFY_SOCKET, as
to systemd; a successor gets them as fd 3... with LISTEN_FDS, LISTEN_FDNAMES and
LISTEN_PID. PIDFILE holds "GENERATION PID" of the running daemon. SIGTERM is passed
on to the daemon, and the holder exits when it does.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import sys


def main() -> int:
    sock_path, pidfile, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(sock_path)
    stored: dict[str, int] = {}
    stopping = False
    generation = 0

    def spawn() -> int:
        nonlocal generation
        generation += 1
        names = list(stored)
        pid = os.fork()
        if pid == 0:  # the child: stored fds to 3..., then exec
            high = [fcntl.fcntl(stored[n], fcntl.F_DUPFD_CLOEXEC, 1000) for n in names]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)  # dup2 clears close-on-exec
            env = dict(os.environ, NOTIFY_SOCKET=sock_path)
            if names:
                env.update(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names),
                           LISTEN_PID=str(os.getpid()))
            os.execvpe(cmd[0], cmd, env)
        tmp = pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{generation} {pid}\n")
        os.replace(tmp, pidfile)
        return pid

    child = spawn()
    parent = os.getppid()

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    while True:
        try:
            ready, _, _ = select.select([sock], [], [], 0.05)
        except InterruptedError:
            ready = []
        if ready:
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 64)
            fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
            if fields.get("FDSTORE") == "1" and fds:
                name = fields.get("FDNAME", "stored")
                old = stored.get(name)
                if old is not None:
                    os.close(old)
                stored[name] = fds[0]
                for extra in fds[1:]:
                    os.close(extra)
            else:
                if fields.get("FDSTOREREMOVE") == "1":  # as systemd: close and forget them
                    gone = stored.pop(fields.get("FDNAME", ""), None)
                    if gone is not None:
                        os.close(gone)
                for fd in fds:
                    os.close(fd)
        if os.getppid() != parent and not stopping:  # the test runner is gone: stop too
            on_term(signal.SIGTERM, None)
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid == 0:
            continue
        if stopping or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            return 0
        child = spawn()  # died: restart it with the fd store


if __name__ == "__main__":
    sys.exit(main())
