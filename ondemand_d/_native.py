# SPDX-License-Identifier: Apache-2.0
"""The READ hot path: write a filled range into an anon fd and complete the READ.

The sole importer of the cffi module. Two backends with identical semantics:
``cffi`` (csrc/shim.c; the call drops the GIL) and ``python`` (os.pwrite +
fcntl.ioctl). ONDEMAND_D_NATIVE=0 forces the Python backend; =1 makes a
missing shim fatal; unset picks the shim when it imports.

The anon fd's writes are direct I/O: whole 4 KiB blocks from page-aligned
memory. Python `bytes` never are, so the daemon owns a few page-aligned
buffers (`AlignedPool`, anonymous mmaps, reused for every fill):

* `fill_parts(fd, parts, off, ...)` copies verified chunk bytes into one of
  them once (no join, no per-call buffer) and writes it directly;
* `fill_aligned(fd, buf, length, off, ...)` writes a buffer the caller took
  from the pool and read the data into (e.g. `LocalStore.read_chunk_into`):
  no copy at all.

`fill(fd, buf, off, ...)` still takes any buffer; an unaligned one goes
through the pool like `fill_parts`. Neither path runs the shim's own bounce
buffer (malloc + memcpy per call).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ondemand_d.wire import CACHEFILES_IOC_READ_COMPLETE

BLOCK = 4096
_SHIM_ABI = 1
#: Bytes per pooled buffer: one background batch or one 1 MiB chunk per write.
POOL_BUFFER = 1 << 20


class Backend(Protocol):
    name: str

    def complete(self, fd: int, msg_id: int) -> None: ...

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None: ...

    def fill_parts(
        self, fd: int, parts: Sequence[Any], off: int, msg_id: int, *, complete: bool,
        size: int = 0,
    ) -> int: ...

    def fill_aligned(
        self, fd: int, buf: mmap.mmap, length: int, off: int, msg_id: int, *, complete: bool
    ) -> int: ...


class AlignedPool:
    """Page-aligned buffers (anonymous mmaps) that fills reuse instead of allocating.

    At most `keep` buffers of `size` bytes stay mapped (one per I/O thread is
    enough); a caller that finds none free, or needs more than `size`, gets a
    one-off mapping. Thread-safe.
    """

    def __init__(self, size: int = POOL_BUFFER, keep: int = 8) -> None:
        if size <= 0 or size % BLOCK:
            msg = f"pool buffer size {size} is not a positive multiple of {BLOCK}"
            raise ValueError(msg)
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.mapped = 0  # buffers mapped so far (pooled and one-off): for tests and metrics

    @contextlib.contextmanager
    def take(self, nbytes: int = 0) -> Iterator[mmap.mmap]:
        """A page-aligned buffer of at least `nbytes` (rounded up to a block), zero or not."""
        buf = self.acquire(nbytes)
        try:
            yield buf
        finally:
            self.release(buf)

    def acquire(self, nbytes: int = 0) -> mmap.mmap:
        """`take` without the context manager (the fill path's hot loop): `release` it."""
        if nbytes <= self.size:
            with self._lock:
                if self._free:
                    return self._free.pop()
            want = self.size
        else:
            want = _round_up(nbytes)
        self.mapped += 1
        return mmap.mmap(-1, want)  # mmap memory is page-aligned

    def release(self, buf: mmap.mmap) -> None:
        if len(buf) == self.size:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)
                    return
        # A failed write's traceback may still hold a view; then GC frees it.
        with contextlib.suppress(BufferError):
            buf.close()


#: The process's pool: every backend fills from it.
POOL = AlignedPool()
_ZEROS = memoryview(bytes(POOL_BUFFER))  # sliced without copying


class _Filler:
    """What both backends share: the pool paths, on top of `_write_aligned` and `complete`."""

    pool: AlignedPool = POOL

    def complete(self, fd: int, msg_id: int) -> None:
        raise NotImplementedError

    def _write_aligned(  # noqa: PLR0913 - one syscall's arguments
        self, fd: int, buf: mmap.mmap, length: int, off: int, msg_id: int, complete: bool,  # noqa: FBT001
    ) -> None:
        """Write buf[:length] at off (length: whole blocks), then complete if asked."""
        raise NotImplementedError

    def fill_aligned(
        self, fd: int, buf: mmap.mmap, length: int, off: int, msg_id: int, *, complete: bool
    ) -> int:
        """Write buf[:length] (buf: from `pool.take`) at `off`, zero-padded to the block.

        No copy: the data goes to the kernel from `buf`. Returns the bytes written.
        """
        if off % BLOCK:
            raise oserror(-errno.EINVAL)
        padded = _round_up(length)
        if padded > len(buf) or length < 0:
            msg = f"{length} bytes do not fit a buffer of {len(buf)}"
            raise ValueError(msg)
        buf[length:padded] = _ZEROS[: padded - length]
        self._write_aligned(fd, buf, padded, off, msg_id, complete)
        return padded

    def fill_parts(
        self, fd: int, parts: Sequence[Any], off: int, msg_id: int, *, complete: bool,
        size: int = 0,
    ) -> int:
        """Write the concatenation of `parts` at `off`, then zeros up to `size` bytes.

        Each byte is copied once, into a pooled aligned buffer, and written from
        there, a buffer at a time; the last block is zero-padded, the last write
        also completes. Memory stays one buffer whatever `size` asks. Returns the
        bytes written.
        """
        if off % BLOCK:
            raise oserror(-errno.EINVAL)
        pool = self.pool
        buf = pool.acquire()
        try:
            room = len(buf)
            data = 0
            for p in parts:
                data += len(p) if isinstance(p, bytes) else memoryview(p).nbytes
            total = max(size, data)
            if total <= room:  # the common case: one window, one write
                pos = 0
                for p in parts:
                    n = len(p) if isinstance(p, bytes) else memoryview(p).nbytes
                    buf[pos : pos + n] = p
                    pos += n
                padded = _round_up(total)
                buf[pos:padded] = _ZEROS[: padded - pos]
                self._write_aligned(fd, buf, padded, off, msg_id, complete)
                return padded
            return self._fill_windows(fd, buf, parts, off, msg_id, complete, total - data)
        finally:
            pool.release(buf)

    def _fill_windows(  # noqa: PLR0913
        self, fd: int, buf: mmap.mmap, parts: Sequence[Any], off: int, msg_id: int,
        complete: bool, zeros: int,  # noqa: FBT001
    ) -> int:
        """fill_parts for more than one buffer: write each full window once more follows."""
        room = len(buf)
        done = pos = 0  # bytes written; bytes of the current window in buf
        for v in [*(memoryview(p).cast("B") for p in parts), None]:
            while True:
                left = len(v) if v is not None else zeros
                if not left:
                    break
                if pos == room:  # full, and more follows: write it
                    self._write_aligned(fd, buf, room, off + done, 0, False)
                    done, pos = done + room, 0
                n = min(room - pos, left)
                if v is not None:
                    buf[pos : pos + n] = v[:n]
                    v = v[n:]
                else:
                    buf[pos : pos + n] = _ZEROS[:n]
                    zeros -= n
                pos += n
        padded = _round_up(pos)
        buf[pos:padded] = _ZEROS[: padded - pos]
        self._write_aligned(fd, buf, padded, off + done, msg_id, complete)
        return done + padded


def oserror(neg_errno: int) -> OSError:
    """The OSError for a C function's -errno return."""
    return OSError(-neg_errno, os.strerror(-neg_errno))


class PythonBackend(_Filler):
    """os.pwrite + fcntl.ioctl; unaligned data through the pool."""

    name = "python"

    def complete(self, fd: int, msg_id: int) -> None:
        fcntl.ioctl(fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)

    def _write_aligned(  # noqa: PLR0913
        self, fd: int, buf: mmap.mmap, length: int, off: int, msg_id: int, complete: bool,  # noqa: FBT001
    ) -> None:
        with memoryview(buf) as b:
            _pwrite_all(fd, b[:length], off)
        if complete:
            self.complete(fd, msg_id)

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        if off % BLOCK:
            raise oserror(-errno.EINVAL)
        view = memoryview(buf).cast("B")
        n = len(view)
        whole = n - n % BLOCK
        if whole and _is_aligned(buf):
            _pwrite_all(fd, view[:whole], off)
            rest = view[whole:]
            if len(rest):
                self.fill_parts(fd, [rest], off + whole, msg_id, complete=False)
        else:
            self.fill_parts(fd, [view], off, msg_id, complete=False)
        if complete:
            self.complete(fd, msg_id)


class CffiBackend(_Filler):
    """csrc/shim.c through cffi; each write (and the completion) with the GIL released."""

    name = "cffi"

    def __init__(self, shim: Any) -> None:
        if shim.lib.ONDEMAND_SHIM_ABI != _SHIM_ABI:
            msg = f"ondemand_d._shim ABI {shim.lib.ONDEMAND_SHIM_ABI}, expected {_SHIM_ABI}"
            raise ImportError(msg)
        self._ffi = shim.ffi
        self._lib = shim.lib

    def complete(self, fd: int, msg_id: int) -> None:
        rc = self._lib.od_read_complete(fd, msg_id)
        if rc:
            raise oserror(rc)

    def _write_aligned(  # noqa: PLR0913
        self, fd: int, buf: mmap.mmap, length: int, off: int, msg_id: int, complete: bool,  # noqa: FBT001
    ) -> None:
        # Aligned address, whole blocks: od_fill writes straight from buf, no bounce.
        with self._ffi.from_buffer(buf) as cbuf:
            rc = self._lib.od_fill(fd, cbuf, length, off, msg_id, 1 if complete else 0)
        if rc:
            raise oserror(rc)

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        if _is_aligned(buf) and len(memoryview(buf).cast("B")) % BLOCK == 0:
            with self._ffi.from_buffer(buf) as cbuf:
                rc = self._lib.od_fill(fd, cbuf, len(cbuf), off, msg_id, 1 if complete else 0)
            if rc:
                raise oserror(rc)
            return
        if off % BLOCK:
            raise oserror(-errno.EINVAL)
        self.fill_parts(fd, [buf], off, msg_id, complete=complete)


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _is_aligned(buf: Any) -> bool:
    if isinstance(buf, mmap.mmap):
        return True
    try:
        import ctypes  # noqa: PLC0415 - only for the address of a writable buffer

        return ctypes.addressof(ctypes.c_char.from_buffer(buf)) % BLOCK == 0
    except TypeError:  # read-only buffers (bytes): unknown address, take the bounce path
        return False


def _pwrite_all(fd: int, view: memoryview, off: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, off)
        if n <= 0:
            raise oserror(-errno.EIO)
        view = view[n:]
        off += n


def _shim_module() -> Any:
    """The compiled cffi module (ImportError when it was not built)."""
    from ondemand_d import _shim  # type: ignore[attr-defined,unused-ignore]  # noqa: PLC0415

    return _shim


def load_backend(choice: str | None = None) -> Backend:
    """Pick the backend: `choice` or $ONDEMAND_D_NATIVE ("0", "1" or unset)."""
    choice = os.environ.get("ONDEMAND_D_NATIVE", "") if choice is None else choice
    if choice in ("0", "python"):
        return PythonBackend()
    try:
        return CffiBackend(_shim_module())
    except ImportError:
        if choice in ("1", "cffi"):
            raise
        return PythonBackend()
