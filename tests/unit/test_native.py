# SPDX-License-Identifier: Apache-2.0
"""_native.py: both backends write the same aligned, zero-padded bytes and fail alike."""
from __future__ import annotations

import errno
import mmap
import os

import pytest

from ondemand_d import _native


@pytest.fixture(params=["cffi", "python"])
def backend(request):
    b = _native.load_backend(request.param)
    assert b.name == request.param  # the shim must be built: a missing one is a failure here
    return b


@pytest.mark.parametrize("length", [1, 4095, 4096, 4097, 3 * 4096, (1 << 20) + 5, (3 << 20) + 4096])
def test_fill_writes_and_pads(backend, tmp_path, length):
    path = tmp_path / "cache"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    data = os.urandom(length)
    backend.fill(fd, data, 8192, 0, complete=False)
    os.close(fd)
    got = path.read_bytes()
    padded = -(-length // 4096) * 4096
    assert len(got) == 8192 + padded
    assert got[8192 : 8192 + length] == data
    assert got[8192 + length :] == bytes(padded - length)


def test_fill_from_aligned_mmap(backend, tmp_path):
    buf = mmap.mmap(-1, 2 * 4096)
    buf[:] = os.urandom(len(buf))
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    backend.fill(fd, buf, 4096, 0, complete=False)
    os.close(fd)
    assert (tmp_path / "c").read_bytes()[4096:] == buf[:]


def test_unaligned_offset_is_einval(backend, tmp_path):
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError) as info:
        backend.fill(fd, b"x", 100, 0, complete=False)
    os.close(fd)
    assert info.value.errno == errno.EINVAL


def test_complete_on_plain_file_is_enotty(backend, tmp_path):
    """The ioctl is really issued: a regular file answers ENOTTY."""
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError) as info:
        backend.complete(fd, 7)
    assert info.value.errno == errno.ENOTTY
    with pytest.raises(OSError) as info:
        backend.fill(fd, b"abc", 0, 7, complete=True)  # written, then the ioctl fails
    os.close(fd)
    assert info.value.errno == errno.ENOTTY
    assert (tmp_path / "c").read_bytes()[:3] == b"abc"


def test_write_error_is_oserror(backend, tmp_path):
    (tmp_path / "c").write_bytes(b"")
    fd = os.open(tmp_path / "c", os.O_RDONLY)
    with pytest.raises(OSError) as info:
        backend.fill(fd, b"x" * 4096, 0, 0, complete=False)
    os.close(fd)
    assert info.value.errno == errno.EBADF


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("ONDEMAND_D_NATIVE", "0")
    assert _native.load_backend().name == "python"
    monkeypatch.setenv("ONDEMAND_D_NATIVE", "1")
    assert _native.load_backend().name == "cffi"


def test_abi_mismatch_is_import_error():
    class FakeLib:
        ONDEMAND_SHIM_ABI = 99

    class FakeShim:
        lib = FakeLib()
        ffi = None

    with pytest.raises(ImportError, match="ABI 99"):
        _native.CffiBackend(FakeShim())
