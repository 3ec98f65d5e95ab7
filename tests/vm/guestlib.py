# SPDX-License-Identifier: Apache-2.0
"""Helpers for check_* functions that run inside the guest (as root, real kernel).

The kernel helpers are deliberately independent of ondemand_d: they talk to /dev/cachefiles
and mount(2) directly so the tests check the kernel's behaviour, not the daemon's beliefs about
it. The daemon is started as users run it, by ``ondemand_d_argv()`` (from the guest runner).
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import mmap
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ondemand_d.guest.runner import ondemand_d_argv

F = TypeVar("F", bound=Callable[..., Any])

DEVICE = "/dev/cachefiles"
MSG_MAX = 1024                      # CACHEFILES_MSG_MAX_SIZE, include/uapi/linux/cachefiles.h
HEADER = struct.Struct("=IIII")     # cachefiles_msg: msg_id, opcode, len, object_id (16 bytes)
OPEN = struct.Struct("=IIII")       # cachefiles_open: volume_key_size, cookie_key_size, fd, flags
READ = struct.Struct("=QQ")         # cachefiles_read: off, len
OP_OPEN, OP_CLOSE, OP_READ = 0, 1, 2
IOC_READ_COMPLETE = 0x40049801      # _IOW(0x98, 1, int) on x86


def guard(seconds: float) -> Callable[[F], F]:
    """Set a check's wall-clock guard (harness.py enforces it)."""
    def mark(fn: F) -> F:
        fn.timeout = seconds  # type: ignore[attr-defined]
        return fn
    return mark


def write_cmd(fd: int, command: str) -> None:
    """Write one cachefiles command (raises OSError with the kernel's errno)."""
    os.write(fd, command.encode())


def bind_device(cache_dir: Path, tag: str) -> int:
    """Open /dev/cachefiles and bind it in on-demand mode; return the fd."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        write_cmd(fd, f"dir {cache_dir}")
        write_cmd(fd, f"tag {tag}")
        write_cmd(fd, "bind ondemand")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclasses.dataclass(frozen=True)
class Message:
    """One message read from the device, parsed with struct (independent of ondemand_d.wire)."""

    raw: bytes
    msg_id: int
    opcode: int
    length: int
    object_id: int
    volume_key: bytes = b""
    cookie_key: bytes = b""
    fd: int = -1
    flags: int = 0
    off: int = 0
    len: int = 0


def parse(raw: bytes) -> Message:
    msg_id, opcode, length, object_id = HEADER.unpack_from(raw)
    assert length == len(raw), f"header len {length} != read() length {len(raw)}"
    if opcode == OP_OPEN:
        vsize, csize, fd, flags = OPEN.unpack_from(raw, 16)
        assert length == 32 + vsize + csize, (length, vsize, csize)
        volume = raw[32:32 + vsize]
        cookie = raw[32 + vsize:32 + vsize + csize]
        return Message(raw, msg_id, opcode, length, object_id, volume, cookie, fd, flags)
    if opcode == OP_READ:
        assert length == 32, length
        off, n = READ.unpack_from(raw, 16)
        return Message(raw, msg_id, opcode, length, object_id, off=off, len=n)
    assert opcode == OP_CLOSE and length == 16, (opcode, length)
    return Message(raw, msg_id, opcode, length, object_id)


def read_message(fd: int, timeout: float) -> Message | None:
    """Poll the device and return the next message, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if poller.poll(min(left, 0.5) * 1000):
            raw = os.read(fd, MSG_MAX)
            if raw:
                return parse(raw)


_libc = ctypes.CDLL(None, use_errno=True)


def mount_in_child(source: str, target: str, fstype: str, data: str, timeout: float = 20,
                   flags: int = 0) -> int | None:
    """mount(2) in a forked child; return 0 or the errno, or None if it hung (child killed).

    A mount waits for the daemon's copen; in a child it can be killed if nobody answers.
    """
    Path(target).mkdir(parents=True, exist_ok=True)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work, then _exit
        os.close(rfd)
        rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
        os.write(wfd, str(0 if rc == 0 else ctypes.get_errno()).encode())
        os._exit(0)
    os.close(wfd)
    try:
        ready = select.select([rfd], [], [], timeout)[0]
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        value = os.read(rfd, 32)
        os.waitpid(pid, 0)
        return int(value)
    finally:
        os.close(rfd)


def umount(target: str) -> int:
    """umount(2); return 0 or the errno."""
    return 0 if _libc.umount2(target.encode(), 0) == 0 else ctypes.get_errno()


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer (the anon fd's writes are direct I/O)."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


class MiniDaemon(threading.Thread):
    """A minimal on-demand daemon: serves cookie key -> file, records every message.

    It replies ``copen <id>,<size>`` (or ``copen <id>,-<errno>`` for keys in ``fail``), fills
    each READ with the exact requested range from an aligned buffer, and closes anon fds on
    CLOSE. ``on_read`` may look at a READ first (e.g. to try an unaligned write).
    """

    def __init__(self, devfd: int, blobs: Mapping[bytes, Path], fail: Mapping[bytes, int] = {},
                 on_read: Callable[[Message, int], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.devfd, self.blobs, self.fail, self.on_read = devfd, dict(blobs), dict(fail), on_read
        self.messages: list[Message] = []
        self.errors: list[str] = []
        self.objects: dict[int, tuple[int, Path]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                msg = read_message(self.devfd, 0.2)
                if msg is not None:
                    self.messages.append(msg)
                    self.handle(msg)
        except Exception as exc:  # noqa: BLE001 - reported by the check
            self.errors.append(repr(exc))

    def handle(self, msg: Message) -> None:
        if msg.opcode == OP_OPEN:
            if msg.cookie_key in self.fail:
                write_cmd(self.devfd, f"copen {msg.msg_id},-{self.fail[msg.cookie_key]}")
                os.close(msg.fd)
                return
            path = self.blobs[msg.cookie_key]
            self.objects[msg.object_id] = (msg.fd, path)
            write_cmd(self.devfd, f"copen {msg.msg_id},{path.stat().st_size}")
        elif msg.opcode == OP_READ:
            anon, path = self.objects[msg.object_id]
            if self.on_read:
                self.on_read(msg, anon)
            buf = aligned_buffer(msg.len)
            with path.open("rb") as src:
                src.seek(msg.off)
                src.readinto(memoryview(buf)[:msg.len])
            os.pwrite(anon, memoryview(buf)[:msg.len], msg.off)
            import fcntl
            fcntl.ioctl(anon, IOC_READ_COMPLETE, msg.msg_id)
        elif msg.opcode == OP_CLOSE:
            anon, _ = self.objects.pop(msg.object_id)
            os.close(anon)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        for anon, _ in self.objects.values():
            os.close(anon)
        self.objects.clear()


def tree_digests(root: Path) -> dict[str, str]:
    """Map each regular file under root (relative path) to the sha256 of its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(*args: str, timeout: float = 300) -> str:
    """`ondemand-d ARGS` in the guest; its stdout, or an assertion with its output."""
    proc = subprocess.run([*ondemand_d_argv(), *args], capture_output=True, text=True,
                          check=False, timeout=timeout)
    assert proc.returncode == 0, f"ondemand-d {' '.join(args)}: {proc.returncode}\n" \
        f"{proc.stdout}{proc.stderr}"
    return proc.stdout


def errname(code: int | None) -> str:
    return "hung" if code is None else ("ok" if code == 0 else errno.errorcode.get(code, str(code)))


# ------------------------------------------------------------------ ondemand-d as users run it
# (always by ondemand_d.guest.runner.ondemand_d_argv: the virtualenv's interpreter, host and guest)


class Daemon:
    """``ondemand-d serve`` in a child process, its JSON log in ``log``."""

    def __init__(self, store: Path, cache_dir: Path, log: Path, *, tag: str = "ondemand-d",
                 extra: tuple[str, ...] = ()) -> None:
        self.store, self.cache_dir, self.log = store, cache_dir, log
        self.tag, self.extra = tag, extra
        self.proc: Any = None
        self.stderr = log.with_suffix(".stderr")

    def start(self, timeout: float = 30) -> Daemon:
        import subprocess
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [*ondemand_d_argv(), "--store", str(self.store), "serve",
                "--cache-dir", str(self.cache_dir), "--tag", self.tag,
                "--log-format", "json", "--log-level", "info", *self.extra]
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out, self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == "ready" for e in self.events()):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"ondemand-d serve not ready (rc {self.proc.returncode}): "
                             f"{' '.join(argv)}\nstderr: {self.stderr.read_text()[-3000:]}\n"
                             f"log: {self.log.read_text()[-3000:]}")

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """Parsed log lines of this run (since start), optionally filtered by event and keys."""
        import json
        out = []
        if not self.log.exists():
            return out
        with self.log.open("rb") as fh:
            fh.seek(getattr(self, "offset", 0))
            for line in fh.read().decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if event is not None and rec.get("event") != event:
                    continue
                if all(rec.get(k) == v for k, v in match.items()):
                    out.append(rec)
        return out

    def mark(self) -> None:
        """Make events() (and log_tail) start from here: per-check views of a shared daemon."""
        self.offset = self.log.stat().st_size if self.log.exists() else 0

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as fh:
            fh.seek(getattr(self, "offset", 0))
            text = fh.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; return the exit status (kills after ``timeout``)."""
        import signal
        import subprocess
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"ondemand-d did not exit within {timeout} s of SIGTERM")
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def read_in_child(path: str, timeout: float, size: int = -1) -> tuple[str, bytes]:
    """Read a file in a forked child; return ("ok", data) / ("EIO", b"") / ("hung", b"")."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            with open(path, "rb") as fh:
                data = fh.read(size)
            os.write(wfd, b"ok")
        except OSError as exc:
            os.write(wfd, errno.errorcode.get(exc.errno or 0, "E?").encode())
        os._exit(0)
    os.close(wfd)
    try:
        if not select.select([rfd], [], [], timeout)[0]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "hung", b""
        verdict = os.read(rfd, 64).decode()
        os.waitpid(pid, 0)
    finally:
        os.close(rfd)
    if verdict == "ok":
        return "ok", Path(path).read_bytes()
    return verdict, b""


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def mount_erofs(target: str, fsid: str, *, domain: str | None = None,
                devices: tuple[str, ...] = (), timeout: float = 20) -> int | None:
    """mount -t erofs none -o fsid=..[,domain_id=..][,device=..] target (in a child)."""
    opts = [f"fsid={fsid}"]
    if domain:
        opts.append(f"domain_id={domain}")
    opts += [f"device={d}" for d in devices]
    return mount_in_child("none", target, "erofs", ",".join(opts), timeout=timeout)


def registry_config(path: Path, storage: Path, addr: str) -> None:
    """Write (on the host) a docker-registry config serving `storage` on `addr` in the guest."""
    path.write_text(
        "version: 0.1\nlog: {level: warn, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {storage}}}}}\n"
        f"http: {{addr: '{addr}', secret: guest-secret}}\n")


def start_registry(config: Path, log: Path, addr: str, timeout: float = 60) -> subprocess.Popen[bytes]:
    """Start docker-registry with `config` in the guest; return once it listens on `addr`."""
    # The guest boots with its loopback down (systemd brings it up; the plain init does not).
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return proc
        if proc.poll() is not None:
            raise AssertionError(f"docker-registry exited: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"docker-registry did not listen on {addr} within {timeout} s")
