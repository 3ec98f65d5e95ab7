# SPDX-License-Identifier: Apache-2.0
"""A fake cachefiles kernel over a real file descriptor, for tests and benchmarks.

It follows cachefiles-ondemand.md byte for byte where the daemon can see it:

* the device is one end of an AF_UNIX SOCK_SEQPACKET pair, so each read()
  returns exactly one whole message, and none queued reads as EAGAIN (which
  the daemon treats like the kernel's 0);
* every command the daemon writes arrives as one packet, parsed like
  cachefiles_daemon_write (`copen <id>,<size>`, msg_id base 0, size -errno);
* an OPEN carries a real fd: an O_WRONLY fd on a sparse temp file (the
  cache file), truncated to round_up(size, 4096) at `copen`;
* a READ is completed through `complete(fd, msg_id)`; as in 6.10+, a wrong
  fd or msg_id is EINVAL, and the reader then gets data only if
  SEEK_DATA/SEEK_HOLE show no hole in [off, off+len), else EIO.

The ioctl itself cannot be faked on a plain file, so `RecordingBackend` runs
the real backend's write path and reports the completion here instead.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondemand_d import wire
from ondemand_d._native import Backend, oserror

PAGE = 4096


@dataclass
class FakeObject:
    object_id: int
    cookie: bytes
    path: Path
    fd: int  # the anon fd number handed to the daemon
    inode: int = 0
    reader: int = -1  # the fake kernel's own fd on the cache file, for SEEK_DATA checks
    size: int | None = None
    copen_result: int | None = None
    closed_sent: bool = False


@dataclass
class ReadOutcome:
    msg_id: int
    completions: int = 0
    present: bool | None = None  # None until completed
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeKernel:
    """The kernel's side of /dev/cachefiles, plus the cache files."""

    def __init__(self, cache_dir: Path, *, layout: bool = False) -> None:
        self.cache_dir = cache_dir
        self.layout = layout  # cache files where cachefiles puts them (else obj<N>)
        self.daemon_sock, self.kernel_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.daemon_sock.setblocking(False)
        self.kernel_sock.setblocking(False)
        self._msg_ids = itertools.count(1)
        self._object_ids = itertools.count(1)
        self.objects: dict[int, FakeObject] = {}
        self.copens: dict[int, int] = {}  # msg_id -> size or -errno
        self._open_waiters: dict[int, asyncio.Future[int]] = {}
        self._open_objects: dict[int, int] = {}  # OPEN msg_id -> object_id
        self.reads: dict[int, ReadOutcome] = {}
        self._read_objects: dict[int, int] = {}  # READ msg_id -> object_id
        self._ranges: dict[int, tuple[int, int]] = {}  # READ msg_id -> (off, len)
        self._outbox: collections.deque[bytes] = collections.deque()
        self._writer_armed = False
        self._lock = threading.Lock()  # completions arrive from the daemon's I/O threads
        self.bad_commands: list[bytes] = []
        self.bad_completions: list[tuple[int, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.restore_supported = True  # False: a kernel before 6.8 (no `restore`)
        self.commands: list[bytes] = []  # what FakeDevice wrote besides copen
        self._retired: list[FakeObject] = []  # objects replaced by a second OPEN (reopen)

    @property
    def device_fd(self) -> int:
        return self.daemon_sock.fileno()

    def device(self) -> FakeDevice:
        """The daemon's Device for this kernel: copen over the fd, other commands checked here."""
        return FakeDevice(self)

    def cache_path(self, volume: bytes, cookie: bytes) -> Path:
        """Where cachefiles keeps an object: cache/I<volume>/@<xx>/D<cookie> (§2.4).

        `xx` here is a stand-in for the kernel's fscache_hash; the layout is the same.
        """
        fan = f"@{sum(cookie) & 0xFF:02x}"
        return (self.cache_dir / "cache" / f"I{volume.decode()}" / fan /
                f"D{cookie.decode()}")

    def write_command(self, cmd: bytes) -> None:
        """cachefiles_daemon_write for the commands a bound on-demand cache takes besides copen."""
        self.commands.append(cmd)
        word, _, arg = cmd.partition(b" ")
        if word == b"restore":
            if not self.restore_supported:
                raise OSError(errno.EOPNOTSUPP, "unknown command")  # before 6.8
            return
        if word in (b"inuse", b"cull"):
            if b"/" in arg or not arg:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            path = Path(os.getcwd()) / arg.decode()  # relative to the writer's cwd
            if not path.exists():
                raise OSError(errno.ESTALE if word == b"cull" else errno.ENOENT, "no such object")
            if any(o.path == path and not o.closed_sent for o in self.objects.values()):
                raise OSError(errno.EBUSY, "object in use")
            if word == b"cull":
                graveyard = self.cache_dir / "graveyard"
                graveyard.mkdir(exist_ok=True)
                path.rename(graveyard / f"x{path.stat().st_ino}")
            return
        raise OSError(errno.EOPNOTSUPP, "unknown command")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.kernel_sock.fileno(), self._on_command)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.kernel_sock.fileno())
            if self._writer_armed:
                self._loop.remove_writer(self.kernel_sock.fileno())
        for obj in [*self.objects.values(), *self._retired]:
            _close_if_ours(obj)
            os.close(obj.reader)
        self.daemon_sock.close()
        self.kernel_sock.close()

    # -- requests to the daemon -------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Queue a message; like the kernel's xarray, the queue has no bound."""
        self._outbox.append(data)
        self._flush()

    def _flush(self) -> None:
        while self._outbox:
            try:
                self.kernel_sock.send(self._outbox[0])
            except BlockingIOError:
                if not self._writer_armed and self._loop is not None:
                    self._loop.add_writer(self.kernel_sock.fileno(), self._flush)
                    self._writer_armed = True
                return
            self._outbox.popleft()
        if self._writer_armed and self._loop is not None:
            self._loop.remove_writer(self.kernel_sock.fileno())
            self._writer_armed = False

    async def open(self, cookie: bytes, volume: bytes = b"erofs,dom", timeout: float = 10) -> FakeObject:
        """Send an OPEN and wait for its copen; return the object."""
        object_id = next(self._object_ids)
        msg_id = next(self._msg_ids)
        path = self.cache_path(volume, cookie) if self.layout else self.cache_dir / f"obj{object_id}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        fd = os.open(path, os.O_WRONLY)  # like the anon fd: write-only, not cloexec
        obj = FakeObject(object_id, cookie, path, fd, os.fstat(fd).st_ino, os.open(path, os.O_RDONLY))
        self.objects[object_id] = obj
        fut = asyncio.get_running_loop().create_future()
        self._open_waiters[msg_id] = fut
        self._open_objects[msg_id] = object_id
        self.send_raw(wire.build(wire.OpenRequest(msg_id, object_id, volume, cookie, fd, 0)))
        obj.copen_result = await asyncio.wait_for(fut, timeout)
        return obj

    async def reopen(self, obj: FakeObject, volume: bytes = b"erofs,dom",
                     timeout: float = 10) -> FakeObject:
        """A second OPEN of the same object id: the same cache file, a new anon fd."""
        msg_id = next(self._msg_ids)
        fd = os.open(obj.path, os.O_WRONLY)
        new = FakeObject(obj.object_id, obj.cookie, obj.path, fd, obj.inode,
                         os.open(obj.path, os.O_RDONLY))
        self.objects[obj.object_id] = new
        self._retired.append(obj)
        fut = asyncio.get_running_loop().create_future()
        self._open_waiters[msg_id] = fut
        self._open_objects[msg_id] = obj.object_id
        self.send_raw(wire.build(
            wire.OpenRequest(msg_id, obj.object_id, volume, obj.cookie, fd, 0)))
        new.copen_result = await asyncio.wait_for(fut, timeout)
        return new

    def send_read(self, obj: FakeObject, off: int, length: int) -> ReadOutcome:
        msg_id = next(self._msg_ids)
        outcome = ReadOutcome(msg_id)
        self.reads[msg_id] = outcome
        self._read_objects[msg_id] = obj.object_id
        self._ranges[msg_id] = (off, length)
        self.send_raw(wire.build(wire.ReadRequest(msg_id, obj.object_id, off, length)))
        return outcome

    async def read(self, obj: FakeObject, off: int, length: int, timeout: float = 10) -> bool:
        """Send a READ, wait for its completion; True if the range is now present."""
        outcome = self.send_read(obj, off, length)
        await asyncio.wait_for(outcome.done.wait(), timeout)
        assert outcome.present is not None
        return outcome.present

    def close(self, obj: FakeObject) -> None:
        obj.closed_sent = True
        self.send_raw(wire.build(wire.CloseRequest(next(self._msg_ids), obj.object_id)))

    # -- what the daemon does -----------------------------------------------------

    def _on_command(self) -> None:
        while True:
            try:
                data = self.kernel_sock.recv(PAGE)
            except BlockingIOError:
                return
            if not data:
                return
            self._command(data.split(b"\n", 1)[0])

    def _command(self, cmd: bytes) -> None:
        word, _, arg = cmd.partition(b" ")
        if word != b"copen" or b"," not in arg:
            self.bad_commands.append(cmd)
            return
        id_text, _, size_text = arg.partition(b",")
        try:
            msg_id = int(id_text, 0)
            size = int(size_text, 0)
        except ValueError:
            self.bad_commands.append(cmd)
            return
        object_id = self._open_objects.pop(msg_id, None)
        if object_id is None or (size < 0 and size < -4095):
            self.bad_commands.append(cmd)
            return
        self.copens[msg_id] = size
        if size >= 0:
            os.truncate(self.objects[object_id].path, -(-size // PAGE) * PAGE)
            self.objects[object_id].size = size
        fut = self._open_waiters.pop(msg_id)
        if not fut.done():
            fut.set_result(size)

    def complete(self, fd: int, msg_id: int) -> None:
        """CACHEFILES_IOC_READ_COMPLETE on `fd` for `msg_id`, with 6.10's checks."""
        with self._lock:
            object_id = self._read_objects.get(msg_id)
            outcome = self.reads.get(msg_id)
            if object_id is None or outcome is None or outcome.completions:
                self.bad_completions.append((fd, msg_id))
                if outcome is not None:
                    outcome.completions += 1
                raise oserror(-errno.EINVAL)
            obj = self.objects[object_id]
            if os.fstat(fd).st_ino != obj.inode:
                self.bad_completions.append((fd, msg_id))
                raise oserror(-errno.EINVAL)
            del self._read_objects[msg_id]
            outcome.completions += 1
            outcome.present = self.range_present(obj, *self._ranges[msg_id])
        assert self._loop is not None
        self._loop.call_soon_threadsafe(outcome.done.set)

    # -- inspection ---------------------------------------------------------------

    def range_present(self, obj: FakeObject, off: int, length: int) -> bool:
        """No hole in [off, off+len): what cachefiles checks after a completion."""
        fd = obj.reader
        end = off + length
        if end > os.fstat(fd).st_size:
            return False
        try:
            data_at = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            return False
        return data_at <= off and os.lseek(fd, off, os.SEEK_HOLE) >= end

    def cache_bytes(self, obj: FakeObject) -> bytes:
        return obj.path.read_bytes()

    def fd_open(self, obj: FakeObject) -> bool:
        """Whether the daemon still holds the object's anon fd."""
        return _close_if_ours(obj, close=False)


def _close_if_ours(obj: FakeObject, *, close: bool = True) -> bool:
    try:
        ours = os.readlink(f"/proc/self/fd/{obj.fd}") == str(obj.path)
    except OSError:
        return False
    if ours and close:
        os.close(obj.fd)
    return ours


class FakeDevice:
    """What the daemon's Device does, against the fake kernel."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.fd = kernel.device_fd
        self.path = Path("fake")

    def read_message(self) -> bytes | None:
        try:
            return os.read(self.fd, wire.CACHEFILES_MSG_MAX_SIZE) or None
        except BlockingIOError:
            return None

    def copen(self, msg_id: int, size_or_errno: int) -> None:
        os.write(self.fd, wire.format_copen(msg_id, size_or_errno))

    def command(self, text: bytes) -> None:
        self.kernel.write_command(text)

    def restore(self) -> None:
        self.command(wire.format_restore())

    def try_restore(self) -> bool:
        from ondemand_d.device import Device  # noqa: PLC0415

        return Device.try_restore(self)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


class RecordingBackend:
    """The real write path; the completion goes to the fake kernel."""

    def __init__(self, real: Backend, kernel: FakeKernel) -> None:
        self.real = real
        self.kernel = kernel
        self.name = f"{real.name}+fake"

    def complete(self, fd: int, msg_id: int) -> None:
        self.kernel.complete(fd, msg_id)

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        self.real.fill(fd, buf, off, msg_id, complete=False)
        if complete:
            self.kernel.complete(fd, msg_id)

    def fill_parts(
        self, fd: int, parts: Any, off: int, msg_id: int, *, complete: bool, size: int = 0
    ) -> int:
        n = self.real.fill_parts(fd, parts, off, msg_id, complete=False, size=size)
        if complete:
            self.kernel.complete(fd, msg_id)
        return n

    def fill_aligned(
        self, fd: int, buf: Any, length: int, off: int, msg_id: int, *, complete: bool
    ) -> int:
        n = self.real.fill_aligned(fd, buf, length, off, msg_id, complete=False)
        if complete:
            self.kernel.complete(fd, msg_id)
        return n
