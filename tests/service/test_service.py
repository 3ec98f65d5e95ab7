# SPDX-License-Identifier: Apache-2.0
"""The daemon against the fake kernel: real store, real cache files, real writes."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from fakekernel import FakeKernel
from ondemand_d import wire
from ondemand_d.importer import import_image
from ondemand_d.store.model import Blob, Chunk, Image

PAGE = 4096


def _blob_file(tmp: Path, size: int, name: str = "blob", seed: int = 1) -> Path:
    path = tmp / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _ingest(env, size: int, name: str = "data", chunk: int = 1 << 20) -> tuple[Blob, bytes]:
    path = _blob_file(env.tmp, size, name)
    blob = env.store.ingest_file(path, chunk)
    # key `name` is a data device of an image (an image's own name would be a bootstrap)
    env.store.put_image(Image(f"{name}-image", blob.blob_id, ((name, blob.blob_id),)))
    return blob, path.read_bytes()


def _all_complete_once(kernel: FakeKernel) -> None:
    assert kernel.bad_completions == []
    assert all(r.completions == 1 for r in kernel.reads.values()), {
        m: r.completions for m, r in kernel.reads.items() if r.completions != 1
    }


def _events(env, name: str) -> list[dict]:
    return [e for e in env.logs if e["event"] == name]


async def _until(condition, seconds: float) -> None:
    """Poll for something the daemon does in the background; the assertion follows."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


async def test_image_open_read_sequence(env):
    """A mkfs.erofs image: bootstrap prefilled at OPEN, data READs fill the blob exactly."""
    src = env.tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "big").write_bytes(random.Random(2).randbytes(3_000_001))
    (src / "d" / "small").write_text("hello\n")
    meta, blobdev = env.tmp / "meta.img", env.tmp / "blob.img"
    subprocess.run(["mkfs.erofs", "--chunksize=1048576", f"--blobdev={blobdev}", str(meta), str(src)],
                   check=True, capture_output=True)
    import_image(env.store, "img1", meta, [(blobdev, "blob1")])

    boot = await env.kernel.open(b"img1", b"erofs,img1")
    assert boot.copen_result == meta.stat().st_size
    # The prefill runs in the background after the copen.
    await _until(lambda: _events(env, "prefilled"), 2)
    assert env.kernel.range_present(boot, 0, meta.stat().st_size)
    assert env.kernel.cache_bytes(boot)[: meta.stat().st_size] == meta.read_bytes()

    data = await env.kernel.open(b"blob1", b"erofs,img1")
    size = blobdev.stat().st_size
    assert data.copen_result == size
    for off in range(0, size, 128 << 10):
        assert await env.kernel.read(data, off, min(128 << 10, -(-(size - off) // PAGE) * PAGE))
    assert env.kernel.cache_bytes(data)[:size] == blobdev.read_bytes()
    _all_complete_once(env.kernel)
    reads = _events(env, "read_completed")
    assert reads and all(r["outcome"] == "ok" and r["op"] == "READ" for r in reads)
    assert {"msg_id", "object_id", "blob", "off", "len", "chunks", "bytes", "source",
            "duration_ms"} <= set(reads[0])


async def test_concurrent_overlapping_reads_fetch_each_chunk_once(env):
    """Hundreds of overlapping READs in flight at once: right bytes, one fetch per chunk."""
    blob, source = _ingest(env, 8 * (1 << 20) + 12345, chunk=256 << 10)
    obj = await env.kernel.open(b"data")
    rng = random.Random(3)
    outcomes = []
    for _ in range(300):
        off = rng.randrange(0, blob.size) // PAGE * PAGE
        outcomes.append(env.kernel.send_read(obj, off, rng.choice([PAGE, 64 << 10, 1 << 20])))
    await asyncio.wait_for(asyncio.gather(*(o.done.wait() for o in outcomes)), 30)
    assert all(o.present for o in outcomes)
    _all_complete_once(env.kernel)
    touched = {c.digest for o in outcomes for c in blob.chunks_for(*env.kernel._ranges[o.msg_id])}
    assert env.fetcher.fetches == len(touched)
    cache = env.kernel.cache_bytes(obj)
    for o in outcomes:
        off, n = env.kernel._ranges[o.msg_id]
        assert cache[off : off + n][: len(source) - off] == source[off : off + n]


async def test_read_past_blob_end_is_zero_padded(env):
    """The tail block and a range past the end read as zeros, never as a hole."""
    blob, source = _ingest(env, 3 * PAGE + 100, chunk=2 * PAGE)
    obj = await env.kernel.open(b"data")
    assert obj.copen_result == blob.size
    assert await env.kernel.read(obj, 3 * PAGE, PAGE)
    assert await env.kernel.read(obj, 4 * PAGE, 2 * PAGE)
    cache = env.kernel.cache_bytes(obj)
    assert cache[3 * PAGE : 3 * PAGE + 100] == source[3 * PAGE :]
    assert cache[3 * PAGE + 100 : 6 * PAGE] == bytes(3 * PAGE - 100)
    _all_complete_once(env.kernel)


async def test_unknown_blob_gets_enoent_and_fd_closed(env):
    obj = await env.kernel.open(b"no-such-image")
    assert obj.copen_result == -errno.ENOENT
    assert not env.kernel.fd_open(obj)
    (line,) = _events(env, "opened")
    assert line["outcome"] == "unknown" and line["key"] == "no-such-image"


@pytest.mark.parametrize(
    "key",
    [b"../x", b"/etc/passwd", b"a/../../b", b"a\0b", b".hidden", b"x" * 300, b"\xff\xfe", b"a b"],
)
async def test_hostile_keys_are_refused(env, key):
    """A cookie key is a lookup key, never a path: traversal, NUL, long keys get -ENOENT."""
    (env.tmp / "store" / "x").write_text("not a blob")
    obj = await env.kernel.open(key)
    assert obj.copen_result == -errno.ENOENT
    assert not env.kernel.fd_open(obj)
    assert _events(env, "opened")[0]["outcome"] == "bad_key"


async def test_malformed_messages_are_survived(env):
    """Garbage is logged; a broken OPEN is still answered; the daemon keeps serving."""
    blob, source = _ingest(env, 5 * PAGE)
    env.kernel.send_raw(b"\x01\x02")  # shorter than a header
    env.kernel.send_raw(wire.build(wire.CloseRequest(900, 5))[:12] + b"\x00" * 4 + b"xx")
    bad_opcode = bytearray(wire.build(wire.CloseRequest(901, 5)))
    bad_opcode[4] = 7
    env.kernel.send_raw(bytes(bad_opcode))
    # An OPEN whose key sizes run past the message: copen -EINVAL; its fd field is not
    # trusted (it may name another object's fd), so the daemon leaves that number alone.
    fd = os.open(env.tmp / "victim", os.O_WRONLY | os.O_CREAT)
    raw = bytearray(wire.build(wire.OpenRequest(902, 77, b"erofs,x", b"key", fd, 0)))
    raw[20] = 200
    fut = asyncio.get_running_loop().create_future()
    env.kernel._open_waiters[902] = fut
    env.kernel._open_objects[902] = 77
    env.kernel.send_raw(bytes(raw))
    obj = await env.kernel.open(b"data")
    assert obj.copen_result == blob.size
    assert await env.kernel.read(obj, 0, 5 * PAGE)
    assert env.kernel.cache_bytes(obj)[: 5 * PAGE] == source
    assert env.kernel.copens[902] == -errno.EINVAL
    os.fstat(fd)  # still open: raises if the daemon closed it
    os.close(fd)
    assert env.service.counters.malformed == 4
    assert len(_events(env, "malformed_message")) == 4


@pytest.mark.damages_store
async def test_missing_chunk_fails_that_read_only(env):
    blob, source = _ingest(env, 4 << 20)
    env.store.chunk_path(blob.chunks[1].digest).unlink()
    obj = await env.kernel.open(b"data")
    assert not await env.kernel.read(obj, 1 << 20, PAGE)
    assert await env.kernel.read(obj, 0, PAGE)
    assert await env.kernel.read(obj, 2 << 20, 1 << 20)
    assert not env.kernel.range_present(obj, 1 << 20, 1 << 20)
    _all_complete_once(env.kernel)
    failed = [e for e in _events(env, "read_completed") if e["outcome"] == "eio"]
    assert len(failed) == 1 and failed[0]["error_type"] == "ChunkNotFound"


@pytest.mark.damages_store
async def test_corrupt_chunk_is_never_written(env):
    """A chunk whose bytes do not match its digest: EIO, and not one byte reaches the cache."""
    blob, _ = _ingest(env, 3 << 20)
    path = env.store.chunk_path(blob.chunks[2].digest)
    data = bytearray(path.read_bytes())
    data[777] ^= 0x40
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    obj = await env.kernel.open(b"data")
    assert not await env.kernel.read(obj, 2 << 20, 8 * PAGE)
    with open(obj.path, "rb") as f:
        with pytest.raises(OSError):  # ENXIO: no data from there on
            os.lseek(f.fileno(), 2 << 20, os.SEEK_DATA)
    failed = _events(env, "read_completed")
    assert failed[0]["error_type"] == "DigestMismatch"
    # The next attempt fetches again (nothing wrong was remembered) and still fails.
    assert not await env.kernel.read(obj, 2 << 20, PAGE)
    _all_complete_once(env.kernel)


@pytest.mark.damages_store
@pytest.mark.parametrize("damage", ["truncate", "directory"])
async def test_store_file_failing_mid_read(env, damage):
    blob, source = _ingest(env, 2 << 20)
    path = env.store.chunk_path(blob.chunks[0].digest)
    path.chmod(0o644)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(300_000)
    else:
        path.unlink()
        path.mkdir()
    obj = await env.kernel.open(b"data")
    assert not await env.kernel.read(obj, 0, PAGE)
    assert await env.kernel.read(obj, 1 << 20, PAGE)
    assert env.kernel.cache_bytes(obj)[1 << 20 : 2 << 20] == source[1 << 20 :]
    _all_complete_once(env.kernel)


async def test_anon_fd_write_error_completes_without_data(env):
    blob, _ = _ingest(env, 1 << 20)
    obj = await env.kernel.open(b"data")
    # Make the daemon's anon fd unwritable: writes fail with EBADF.
    ro = os.open(obj.path, os.O_RDONLY)
    os.dup2(ro, obj.fd)
    os.close(ro)
    assert not await env.kernel.read(obj, 0, PAGE)
    _all_complete_once(env.kernel)
    assert _events(env, "read_completed")[0]["outcome"] == "eio"


class SlowRemote:
    """A remote source that holds every fetch until released (for CLOSE/drain ordering)."""

    def __init__(self, data: dict[str, bytes], free: int = 0) -> None:
        self.data = data
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.free = free  # fetches served at once before the gate applies

        self.active = self.peak = 0  # fetches under way, and the most at once

    async def fetch(self, blob, chunks):
        self.started.set()
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.free > 0:
                self.free -= 1
            else:
                await self.release.wait()
        finally:
            self.active -= 1
        return [self.data[c.digest] for c in chunks]

    async def aclose(self) -> None:
        pass


def _remote_blob(env, size: int) -> tuple[Blob, bytes, SlowRemote]:
    """A blob whose chunks are not local but remote, served by SlowRemote."""
    blob, source = _ingest(env, size)
    data = {}
    chunks = []
    for c in blob.chunks:
        data[c.digest] = source[c.offset : c.end]
        env.store.chunk_path(c.digest).unlink()
        chunks.append(Chunk(c.offset, c.length, c.digest, remote=_fake_range(c)))
    blob = Blob(blob.blob_id, blob.size, tuple(chunks))
    env.store.blob_path(blob.blob_id).unlink()  # records are never rewritten: make it anew
    env.store.put_blob(blob)
    return blob, source, SlowRemote(data)


def _fake_range(c: Chunk):
    from ondemand_d.store.model import RemoteRange

    return RemoteRange("sha256:" + "0" * 64, c.offset, c.length)


async def test_close_waits_for_inflight_reads(make_env):
    """CLOSE while a READ is being filled: the fd is closed only after its completion."""
    env = await make_env()
    blob, source, remote = _remote_blob(env, 1 << 20)
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    outcome = env.kernel.send_read(obj, 0, PAGE)
    await asyncio.wait_for(remote.started.wait(), 5)
    env.kernel.close(obj)
    await asyncio.sleep(0.05)
    assert env.kernel.fd_open(obj), "fd closed while a READ was in flight"
    remote.release.set()
    await asyncio.wait_for(outcome.done.wait(), 5)
    assert outcome.present
    await _until(lambda: not env.kernel.fd_open(obj), 1)
    assert not env.kernel.fd_open(obj)
    _all_complete_once(env.kernel)


async def test_drain_completes_inflight_reads(make_env):
    """Shutdown: stop reading, finish in-flight READs; a timeout completes the rest without data."""
    env = await make_env()
    blob, source, remote = _remote_blob(env, 2 << 20)
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    first = env.kernel.send_read(obj, 0, PAGE)
    await asyncio.wait_for(remote.started.wait(), 5)
    asyncio.get_running_loop().call_later(0.05, remote.release.set)
    await env.service.drain(5)
    assert first.completions == 1 and first.present
    # A drain that times out still completes every READ it had read, without data.
    env2 = await make_env()
    blob2, _, remote2 = _remote_blob(env2, 1 << 20)
    env2.fetcher.remote = remote2
    obj2 = await env2.kernel.open(b"data")
    stuck = env2.kernel.send_read(obj2, 0, PAGE)
    await asyncio.wait_for(remote2.started.wait(), 5)
    await env2.service.drain(0.1)
    assert stuck.completions == 1 and stuck.present is False
    assert not env2.kernel.fd_open(obj2)


async def test_concurrency_bound_holds_reads_of_one_source(make_env):
    """No more READs of one source are filled at once than the bound; the rest wait in order."""
    env = await make_env(concurrency=2)
    blob, source, remote = _remote_blob(env, 8 << 20)
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    outs = [env.kernel.send_read(obj, i << 20, PAGE) for i in range(6)]
    await asyncio.wait_for(remote.started.wait(), 5)
    await asyncio.sleep(0.05)
    assert env.service.objects.reads_in_flight == 6
    assert env.service.objects.reads_queued == 4
    assert remote.peak == 2
    remote.release.set()
    await asyncio.wait_for(asyncio.gather(*(o.done.wait() for o in outs)), 10)
    assert all(o.present for o in outs)
    _all_complete_once(env.kernel)


async def test_debug_log_follows_one_read(env):
    """At debug level a READ can be followed step by step: planned, writing, completed."""
    _ingest(env, 3 << 20)
    obj = await env.kernel.open(b"data")
    assert await env.kernel.read(obj, (1 << 20) + 8192, PAGE)
    (msg_id,) = env.kernel.reads
    # The kernel saw the completion; the daemon logs right after.
    await _until(lambda: env.service.objects.reads_in_flight == 0, 1)
    steps = [e for e in env.logs if e.get("msg_id") == msg_id]
    assert [e["event"] for e in steps] == ["read_planned", "read_writing", "read_completed"]
    planned, writing, done = steps
    assert (planned["span_off"], planned["span_end"], planned["to_fetch"]) == (1 << 20, 2 << 20, 1)
    assert (writing["at"], writing["bytes"]) == (1 << 20, 1 << 20)
    assert done["key"] == "data" and done["source"] == "local" and done["bytes"] == 1 << 20


async def test_prefetch_writes_data_blob_without_reads(make_env):
    """With prefetch on, a data blob is written whole after its OPEN, before any READ."""
    env = await make_env(prefetch=True)
    blob, source = _ingest(env, (9 << 20) + 4321)
    obj = await env.kernel.open(b"data")
    await _until(lambda: _events(env, "prefilled"), 5)
    (done,) = _events(env, "prefilled")
    assert done["outcome"] == "ok" and done["bytes"] == -(-blob.size // PAGE) * PAGE
    assert env.kernel.range_present(obj, 0, -(-blob.size // PAGE) * PAGE)
    assert env.kernel.cache_bytes(obj)[: blob.size] == source
    assert env.kernel.reads == {}


async def test_close_cancels_prefetch_and_it_writes_no_more(make_env):
    """A CLOSE stops a whole-blob prefetch; its fd is closed and nothing is written after."""
    env = await make_env(prefetch=True)
    blob, source, remote = _remote_blob(env, 12 << 20)
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    await asyncio.wait_for(remote.started.wait(), 5)
    env.kernel.close(obj)
    await _until(lambda: _events(env, "prefilled"), 2)
    (done,) = _events(env, "prefilled")
    assert done["outcome"] == "cancelled" and done["bytes"] == 0
    remote.release.set()
    await asyncio.sleep(0.05)
    assert not env.kernel.fd_open(obj)
    with open(obj.path, "rb") as f, pytest.raises(OSError):
        os.lseek(f.fileno(), 0, os.SEEK_DATA)  # nothing was written


@pytest.mark.damages_store
async def test_damaged_store_records_still_answer_the_open(env):
    """An image record or chunk table that is not valid JSON: the OPEN gets -EIO, never silence."""
    blob, _ = _ingest(env, 5 * PAGE)
    (env.tmp / "store" / "blobs" / f"{blob.blob_id}.json").write_text("{not json")
    env.store._blob_cache.clear()
    obj = await env.kernel.open(b"data")
    assert obj.copen_result == -errno.EIO
    assert not env.kernel.fd_open(obj)
    env.store.put_image(Image("other", env.store.ingest_file(_blob_file(env.tmp, 9000)).blob_id))
    (env.tmp / "store" / "images" / "other.json").write_bytes(b"\xff\xfe garbage")
    assert (await env.kernel.open(b"other")).copen_result == -errno.EIO
    assert env.service.counters.opens_failed == 2


async def test_malformed_open_never_closes_the_device(env):
    """Garbage whose fd field names the device itself: answered, and the device stays open."""
    raw = bytearray(wire.build(wire.OpenRequest(950, 9, b"erofs,x", b"k", env.kernel.device_fd, 0)))
    raw[20] = 99  # cookie size past the message
    fut = asyncio.get_running_loop().create_future()
    env.kernel._open_waiters[950] = fut
    env.kernel._open_objects[950] = 9
    env.kernel.send_raw(bytes(raw))
    assert await asyncio.wait_for(fut, 5) == -errno.EINVAL
    blob, _ = _ingest(env, PAGE)
    assert (await env.kernel.open(b"data")).copen_result == PAGE  # still reading the device


async def test_readahead_writes_the_chunks_after_a_read(make_env):
    """After a READ, the next `readahead` bytes are written before the kernel asks."""
    env = await make_env(readahead=2 << 20)
    blob, source = _ingest(env, 8 << 20)
    obj = await env.kernel.open(b"data")
    assert await env.kernel.read(obj, 0, PAGE)
    await _until(lambda: _events(env, "read_ahead"), 3)
    (ahead,) = _events(env, "read_ahead")
    assert (ahead["off"], ahead["len"], ahead["outcome"]) == (1 << 20, 2 << 20, "ok")
    assert env.kernel.range_present(obj, 0, 3 << 20)
    assert not env.kernel.range_present(obj, 3 << 20, PAGE)
    assert env.kernel.cache_bytes(obj)[: 3 << 20] == source[: 3 << 20]
    # The next READ past the written part reads ahead again, skipping what is there.
    assert await env.kernel.read(obj, 3 << 20, PAGE)
    await _until(lambda: len(_events(env, "read_ahead")) == 2, 3)
    assert _events(env, "read_ahead")[1]["off"] == 4 << 20
    assert env.kernel.cache_bytes(obj)[: 6 << 20] == source[: 6 << 20]
    _all_complete_once(env.kernel)


def _count_writes(env) -> list[tuple[int, int, int]]:
    """(offset, bytes, msg_id) of every write into a cache file, from now on."""
    writes: list[tuple[int, int, int]] = []
    real = env.service.engine.backend

    class Counting:
        name = real.name

        def __getattr__(self, attr):
            return getattr(real, attr)

        def fill_parts(self, fd, parts, off, msg_id, *, complete, size=0):
            writes.append((off, sum(len(p) for p in parts), msg_id))
            return real.fill_parts(fd, parts, off, msg_id, complete=complete, size=size)

    env.service.engine.backend = Counting()
    return writes


async def test_read_joining_a_readahead_and_the_readahead_write_its_chunk_once(make_env):
    """A READ that joins the fetch of a readahead: the first to write the chunk writes it,
    the other finds it written (the cold-read double write); bytes and completion right."""
    env = await make_env(readahead=3 << 20)
    blob, source, remote = _remote_blob(env, 8 << 20)
    remote.free = 1  # the first READ's fetch passes; the readahead's waits at the gate
    env.fetcher.remote = remote
    writes = _count_writes(env)
    obj = await env.kernel.open(b"data")
    assert await env.kernel.read(obj, 0, PAGE)
    await _until(lambda: env.service._background, 2)
    joined = env.kernel.send_read(obj, 2 << 20, PAGE)  # a chunk the readahead is fetching
    await _until(lambda: any(j.waits_on == "joined" for j in env.service.engine.reads.values()),
                 2)
    assert [j.waits_on for j in env.service.engine.reads.values()] == ["joined"]
    remote.release.set()
    await asyncio.wait_for(joined.done.wait(), 5)
    await _until(lambda: _events(env, "read_ahead"), 3)
    assert joined.present is True
    assert env.kernel.cache_bytes(obj)[: 4 << 20] == source[: 4 << 20]
    # Chunk 0 by the first READ, 1-3 by the readahead or the joined READ: each once.
    assert sum(n for _, n, _ in writes) == 4 << 20, writes
    _all_complete_once(env.kernel)


async def test_close_cancels_readahead(make_env):
    env = await make_env(readahead=4 << 20)
    blob, source, remote = _remote_blob(env, 8 << 20)
    remote.free = 1  # the READ's fetch passes; the readahead's waits at the gate
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    first = env.kernel.send_read(obj, 0, PAGE)
    await asyncio.wait_for(first.done.wait(), 5)
    await _until(lambda: env.service._background, 2)
    env.kernel.close(obj)
    await _until(lambda: _events(env, "read_ahead"), 2)
    assert _events(env, "read_ahead")[0]["outcome"] == "cancelled"
    remote.release.set()
    await asyncio.sleep(0.05)
    assert not env.kernel.fd_open(obj)
    assert not env.kernel.range_present(obj, 1 << 20, PAGE)


async def test_readahead_with_gaps_writes_each_chunk_at_its_offset(make_env):
    """Issue 13: chunks written before the readahead leave gaps in its window.

    With 64 KiB store chunks, a 1 MiB background batch holds 16 chunks; with a
    gap at any position every chunk after it must still land at its own offset.
    Each case uses a fresh object (its own cache file): READs of the gap chunks
    first, without readahead, then a READ of chunk 0 whose readahead spans them.
    """
    chunk = 64 << 10
    env = await make_env(readahead=16 * chunk)
    blob, source = _ingest(env, 40 * chunk, chunk=chunk)
    cases = [(g,) for g in range(1, 17)] + [(1, 3, 5, 7, 9, 11, 13, 15), (2, 16), (15, 16), (8, 9, 10)]
    for gaps in cases:
        obj = await env.kernel.open(b"data")
        env.service.objects.readahead = 0
        for g in gaps:
            assert await env.kernel.read(obj, g * chunk, PAGE)
        # The kernel sees a completion just before the daemon finishes the READ.
        await _until(lambda: env.service.objects.reads_in_flight == 0, 5)
        env.service.objects.readahead = 16 * chunk
        assert await env.kernel.read(obj, 0, PAGE)

        def ahead() -> list[dict]:
            return [e for e in _events(env, "read_ahead") if e["object_id"] == obj.object_id]

        await _until(ahead, 5)
        assert [e["outcome"] for e in ahead()] == ["ok"], gaps
        cache = env.kernel.cache_bytes(obj)
        bad = [i for i in range(17) if cache[i * chunk : (i + 1) * chunk] != source[i * chunk : (i + 1) * chunk]]
        assert bad == [], f"gaps at {gaps}: chunks {bad} hold the wrong bytes"
        env.kernel.close(obj)
    _all_complete_once(env.kernel)


async def test_attack_max_bootstrap_bounds_the_prefill_of_an_unwalkable_bootstrap(make_env):
    """A bootstrap whose metadata walk gives up is prefilled whole only up to max_bootstrap
    (`serve` passes the configured cap): above it, nothing is written at OPEN."""
    for cap, whole in ((1 << 20, True), (8192, False)):
        env = await make_env(max_bootstrap=cap)
        path = _blob_file(env.tmp, 16 * PAGE, "junk")  # random bytes: no EROFS superblock
        blob = env.store.ingest_file(path, 1 << 20)
        env.store.put_image(Image("junk", blob.blob_id, ()))
        obj = await env.kernel.open(b"junk")
        await _until(lambda env=env: _events(env, "prefilled"), 5)
        (done,) = _events(env, "prefilled")
        assert done["bytes"] == (16 * PAGE if whole else 0), done
        assert env.kernel.range_present(obj, 0, 16 * PAGE) is whole
        env.logs.clear()
