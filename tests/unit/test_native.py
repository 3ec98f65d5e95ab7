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


# -- the aligned pool: one copy into a reused buffer, written straight from it ---------


@pytest.mark.parametrize("sizes", [[1], [4096, 1], [5000, 3000, 4096], [(1 << 20) - 1, 2, 4096],
                                   [3 << 20, 7]])
def test_fill_parts_writes_the_concatenation(backend, tmp_path, sizes):
    parts = [os.urandom(n) for n in sizes]
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    written = backend.fill_parts(fd, parts, 4096, 0, complete=False)
    os.close(fd)
    data = b"".join(parts)
    padded = -(-len(data) // 4096) * 4096
    assert written == padded
    assert (tmp_path / "c").read_bytes() == bytes(4096) + data + bytes(padded - len(data))


def test_fill_parts_zero_fills_up_to_size_one_buffer_at_a_time(backend, tmp_path):
    """Past a blob's end the READ's range is zeros: written a pool buffer at a time,
    whatever the size (no allocation of the whole range)."""
    (tmp_path / "c").write_bytes(b"\xff" * (6 << 20))
    fd = os.open(tmp_path / "c", os.O_WRONLY)
    before = _native.POOL.mapped
    written = backend.fill_parts(fd, [b"tail"], 0, 0, complete=False, size=(5 << 20) + 3)
    os.close(fd)
    got = (tmp_path / "c").read_bytes()
    assert written == (5 << 20) + 4096
    assert got[:4] == b"tail" and got[4:written] == bytes(written - 4)
    assert got[written:] == b"\xff" * ((6 << 20) - written)
    assert _native.POOL.mapped - before <= 1


def test_fill_parts_completes_once_after_the_data(backend, tmp_path):
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError) as info:  # a regular file answers the ioctl with ENOTTY
        backend.fill_parts(fd, [b"a" * (3 << 20)], 0, 7, complete=True)
    os.close(fd)
    assert info.value.errno == errno.ENOTTY
    assert (tmp_path / "c").read_bytes() == b"a" * (3 << 20)  # all written before it


def test_fill_aligned_writes_the_callers_buffer(backend, tmp_path):
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    data = os.urandom(10000)
    with _native.POOL.take(len(data)) as buf:
        buf[: len(data)] = data
        buf[len(data) : len(data) + 100] = b"\xff" * 100  # stale bytes: must become zeros
        assert backend.fill_aligned(fd, buf, len(data), 8192, 0, complete=False) == 12288
    os.close(fd)
    assert (tmp_path / "c").read_bytes() == bytes(8192) + data + bytes(12288 - 10000)


def test_pool_reuses_its_buffers(backend, tmp_path):
    pool = _native.AlignedPool(size=64 << 10, keep=2)
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    filler = type(backend)(*([] if backend.name == "python" else [_native._shim_module()]))
    filler.pool = pool
    for i in range(50):
        filler.fill_parts(fd, [os.urandom(5000), os.urandom(100)], i * 8192, 0, complete=False)
    os.close(fd)
    assert pool.mapped == 1
    with pool.take() as a, pool.take() as b, pool.take() as c:
        assert len({id(a), id(b), id(c)}) == 3
    assert pool.mapped == 3  # two more were needed at once; two stay pooled
    with pool.take(1 << 20) as big:  # larger than a pooled buffer: a one-off mapping
        assert len(big) == 1 << 20
    assert pool.mapped == 4


class _RecordingLib:
    """The shim's functions, recording the buffers od_fill gets (then calling the real one)."""

    ONDEMAND_SHIM_ABI = 1

    def __init__(self, shim):
        self.real = shim.lib
        self.ffi = shim.ffi
        self.calls: list[tuple[int, int]] = []

    def od_fill(self, fd, buf, length, off, msg_id, complete):
        self.calls.append((int(self.ffi.cast("uintptr_t", buf)), length))
        return self.real.od_fill(fd, buf, length, off, msg_id, complete)

    def od_read_complete(self, fd, msg_id):
        return self.real.od_read_complete(fd, msg_id)


@pytest.mark.parametrize("how", ["fill", "fill_parts"])
def test_cffi_never_takes_the_shims_bounce_path(tmp_path, how):
    """od_fill copies through its own malloc'd bounce buffer when the source is unaligned
    or ends mid-block; the backend only ever hands it aligned, whole-block buffers."""
    shim = _native._shim_module()
    lib = _RecordingLib(shim)

    class Shim:
        ffi = shim.ffi

    Shim.lib = lib
    backend = _native.CffiBackend(Shim())
    fd = os.open(tmp_path / "c", os.O_WRONLY | os.O_CREAT)
    datas = [os.urandom(n) for n in (1, 4096, 5000, (1 << 20) + 3)]
    off = 0
    for data in datas:
        if how == "fill":
            backend.fill(fd, data, off, 0, complete=False)  # bytes: never page-aligned
        else:
            backend.fill_parts(fd, [data[:7], data[7:]], off, 0, complete=False)
        off += -(-len(data) // 4096) * 4096
    os.close(fd)
    assert lib.calls
    assert all(addr % 4096 == 0 and length % 4096 == 0 for addr, length in lib.calls)
    got = (tmp_path / "c").read_bytes()
    pos = 0
    for data in datas:
        assert got[pos : pos + len(data)] == data
        pos += -(-len(data) // 4096) * 4096
