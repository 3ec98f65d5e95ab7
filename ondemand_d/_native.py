# SPDX-License-Identifier: Apache-2.0
"""The READ hot path: write a filled range into an anon fd and complete the READ.

The sole importer of the cffi module. Two backends with identical semantics:
``cffi`` (csrc/shim.c; the call drops the GIL) and ``python`` (os.pwrite +
fcntl.ioctl). ONDEMAND_D_NATIVE=0 forces the Python backend; =1 makes a
missing shim fatal; unset picks the shim when it imports.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from typing import Any, Protocol

from ondemand_d.wire import CACHEFILES_IOC_READ_COMPLETE

BLOCK = 4096
_SHIM_ABI = 1


class Backend(Protocol):
    name: str

    def complete(self, fd: int, msg_id: int) -> None: ...

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None: ...


def oserror(neg_errno: int) -> OSError:
    """The OSError for a C function's -errno return."""
    return OSError(-neg_errno, os.strerror(-neg_errno))


class PythonBackend:
    """os.pwrite + fcntl.ioctl; aligned pieces through a page-aligned bounce buffer."""

    name = "python"

    def complete(self, fd: int, msg_id: int) -> None:
        fcntl.ioctl(fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        if off % BLOCK:
            raise oserror(-errno.EINVAL)
        view = memoryview(buf).cast("B")
        n = len(view)
        whole = n - n % BLOCK
        if whole and _is_aligned(buf):
            _pwrite_all(fd, view[:whole], off)
            done = whole
        else:
            done = 0
        if done < n:
            bounce = mmap.mmap(-1, min(n - done + BLOCK, 1 << 20))  # mmap memory is page-aligned
            try:
                while done < n:
                    piece = min(n - done, len(bounce) - BLOCK)
                    padded = -(-piece // BLOCK) * BLOCK
                    bounce[:piece] = view[done : done + piece]
                    bounce[piece:padded] = bytes(padded - piece)
                    with memoryview(bounce) as b:
                        _pwrite_all(fd, b[:padded], off + done)
                    done += piece
            finally:
                # A failed write's traceback may still hold a view; then GC frees it.
                with contextlib.suppress(BufferError):
                    bounce.close()
        if complete:
            self.complete(fd, msg_id)


class CffiBackend:
    """csrc/shim.c through cffi; one call fills and completes with the GIL released."""

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

    def fill(self, fd: int, buf: Any, off: int, msg_id: int, *, complete: bool) -> None:
        cbuf = self._ffi.from_buffer(buf)
        rc = self._lib.od_fill(fd, cbuf, len(cbuf), off, msg_id, 1 if complete else 0)
        if rc:
            raise oserror(rc)


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


def load_backend(choice: str | None = None) -> Backend:
    """Pick the backend: `choice` or $ONDEMAND_D_NATIVE ("0", "1" or unset)."""
    choice = os.environ.get("ONDEMAND_D_NATIVE", "") if choice is None else choice
    if choice in ("0", "python"):
        return PythonBackend()
    try:
        from ondemand_d import _shim  # type: ignore[attr-defined,unused-ignore]  # noqa: PLC0415

        return CffiBackend(_shim)
    except ImportError:
        if choice in ("1", "cffi"):
            raise
        return PythonBackend()
