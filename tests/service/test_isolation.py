# SPDX-License-Identifier: Apache-2.0
"""Issue 9's behaviours: one object's or one source's trouble stays its own.

Each test is a scenario that went wrong before the state machine (protocol.py),
the fill engine (fill.py) and the fetcher owning its fetches (store/fetch.py).
The timeouts are guards against a hang, never a measure of speed.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import tracemalloc

from ondemand_d import wire
from ondemand_d.control.inflight import inflight
from ondemand_d.fill import PAD_LIMIT
from ondemand_d.importer import import_image
from ondemand_d.store.model import Image
from tests.service.test_service import (
    PAGE, _all_complete_once, _events, _ingest, _remote_blob, _until,
)

GUARD = 10  # seconds before a wait counts as a hang


async def test_stalled_registry_does_not_stop_local_opens_and_reads(make_env):
    """80 READs wait on a registry that does not answer; a local image still opens and reads.

    With 64 READs held the old daemon stopped reading the device, so the local
    OPEN waited for the registry (its fetch deadline, minutes by default).
    """
    env = await make_env(concurrency=64)
    _, local = _ingest(env, 5 * PAGE, name="local")
    blob, source, remote = _remote_blob(env, 1 << 20)
    env.fetcher.remote = remote
    obj = await env.kernel.open(b"data")
    stuck = [env.kernel.send_read(obj, (i % 256) * PAGE, PAGE) for i in range(80)]
    await asyncio.wait_for(remote.started.wait(), GUARD)

    near = await env.kernel.open(b"local", timeout=GUARD)
    assert near.copen_result == 5 * PAGE
    assert await env.kernel.read(near, 0, 5 * PAGE, timeout=GUARD)
    assert env.kernel.cache_bytes(near)[: 5 * PAGE] == local
    assert not any(o.done.is_set() for o in stuck), "the remote READs were answered meanwhile"
    assert env.service.objects.reads_queued == 80 - 64  # held by the daemon, in order
    # The kernel sees the local READ complete from the I/O thread; the daemon lets go of it
    # when the loop takes the outcome, a moment later: wait for that, then count.
    await _until(lambda: all(r["key"] == "data" for r in inflight(env.service, 3600)), GUARD)
    rows = inflight(env.service, hung_after=3600)
    assert len(rows) == 80 and sum(r["waits_on"] == "slot" for r in rows) == 80 - 64, rows

    remote.release.set()
    await asyncio.wait_for(asyncio.gather(*(o.done.wait() for o in stuck)), GUARD)
    assert all(o.present for o in stuck)
    assert env.kernel.cache_bytes(obj)[: 1 << 20] == source
    _all_complete_once(env.kernel)


async def test_read_joining_a_prefetch_obeys_the_fetch_deadline(make_env):
    """A prefetch fetches with no deadline of its own; a READ that joins it still gets one."""
    env = await make_env(prefetch=True)
    blob, _, remote = _remote_blob(env, 4 << 20)
    env.fetcher.remote = remote
    env.fetcher.deadline = 0.3  # the registry's fetch_deadline, made short
    obj = await env.kernel.open(b"data")
    await asyncio.wait_for(remote.started.wait(), GUARD)  # the prefetch is fetching chunk 0
    fetches = env.fetcher.fetches

    outcome = env.kernel.send_read(obj, 0, PAGE)
    await asyncio.wait_for(outcome.done.wait(), GUARD)
    assert outcome.present is False  # EIO after the deadline, not a wait without end
    assert env.fetcher.fetches == fetches  # it joined the prefetch's fetch
    (line,) = [e for e in _events(env, "read_completed") if e["msg_id"] == outcome.msg_id]
    assert line["error_type"] == "FetchError" and "0.3 s" in line["error"]
    remote.release.set()
    _all_complete_once(env.kernel)


async def test_close_of_one_object_does_not_fail_another_objects_read(make_env):
    """X's readahead fetches a chunk, Y's READ joins that fetch, X is closed: Y gets its bytes."""
    env = await make_env(readahead=4 << 20)
    blob, source, remote = _remote_blob(env, 8 << 20)
    remote.free = 1  # X's own READ passes; its readahead waits at the gate
    env.fetcher.remote = remote
    x = await env.kernel.open(b"data")
    assert await env.kernel.read(x, 0, PAGE, timeout=GUARD)
    await _until(lambda: remote.active >= 1, GUARD)  # the readahead is fetching 1M..5M
    y = await env.kernel.open(b"data")
    fetches = env.fetcher.fetches
    outcome = env.kernel.send_read(y, 1 << 20, PAGE)
    await _until(lambda: env.service.objects.reads_in_flight == 1, GUARD)
    env.kernel.close(x)
    await _until(lambda: not env.kernel.fd_open(x) or outcome.done.is_set(), 1)
    remote.release.set()

    await asyncio.wait_for(outcome.done.wait(), GUARD)
    assert outcome.present, "Y's READ failed because X was closed"
    assert env.fetcher.fetches == fetches  # Y joined X's fetch, it did not start its own
    assert env.kernel.cache_bytes(y)[1 << 20 : 2 << 20] == source[1 << 20 : 2 << 20]
    await _until(lambda: env.service.objects.reads_in_flight == 0, GUARD)  # logged after
    (line,) = [e for e in _events(env, "read_completed") if e["msg_id"] == outcome.msg_id]
    assert line["outcome"] == "ok" and line["source"] == "joined"
    await _until(lambda: not env.kernel.fd_open(x), GUARD)
    assert not env.kernel.fd_open(x)
    _all_complete_once(env.kernel)


async def test_second_open_with_reads_in_flight_closes_the_old_fd(make_env):
    """The kernel OPENs an object again while a READ on the old fd is in flight: no fd leaks."""
    env = await make_env()
    blob, source, remote = _remote_blob(env, 1 << 20)
    env.fetcher.remote = remote
    old = await env.kernel.open(b"data")
    first = env.kernel.send_read(old, 0, PAGE)
    await asyncio.wait_for(remote.started.wait(), GUARD)

    new = await env.kernel.reopen(old, timeout=GUARD)
    assert new.copen_result == blob.size and new.fd != old.fd
    assert env.kernel.fd_open(old)  # its READ still writes through it
    remote.release.set()
    await asyncio.wait_for(first.done.wait(), GUARD)
    assert first.present
    await _until(lambda: not env.kernel.fd_open(old), GUARD)
    assert not env.kernel.fd_open(old), "the old fd leaked"
    assert await env.kernel.read(new, 4 * PAGE, PAGE, timeout=GUARD)  # served on the new fd
    env.kernel.close(new)
    await _until(lambda: not env.kernel.fd_open(new), GUARD)
    assert not env.kernel.fd_open(new)
    _all_complete_once(env.kernel)


async def test_malformed_open_does_not_close_the_fd_it_names(env):
    """Garbage whose fd field names a live object's anon fd: answered, and that object lives on."""
    blob, source = _ingest(env, 5 * PAGE)
    obj = await env.kernel.open(b"data")
    raw = bytearray(wire.build(wire.OpenRequest(960, 9, b"erofs,x", b"k", obj.fd, 0)))
    raw[20] = 99  # cookie size past the message: unparsable
    fut = asyncio.get_running_loop().create_future()
    env.kernel._open_waiters[960] = fut
    env.kernel._open_objects[960] = 9
    env.kernel.send_raw(bytes(raw))
    assert await asyncio.wait_for(fut, GUARD) == -errno.EINVAL
    assert env.kernel.fd_open(obj)
    assert await env.kernel.read(obj, 0, 5 * PAGE, timeout=GUARD)
    assert env.kernel.cache_bytes(obj)[: 5 * PAGE] == source
    _all_complete_once(env.kernel)


async def test_unaligned_read_in_the_last_page_past_the_end_gets_zeros(env):
    """The blob ends 100 bytes into its last page; a READ of bytes 200..300 of that page."""
    blob, source = _ingest(env, 3 * PAGE + 100, chunk=2 * PAGE)
    obj = await env.kernel.open(b"data")
    assert await env.kernel.read(obj, 3 * PAGE + 200, 100, timeout=GUARD)
    cache = env.kernel.cache_bytes(obj)
    assert cache[2 * PAGE : 3 * PAGE + 100] == source[2 * PAGE :]
    assert cache[3 * PAGE + 100 : 4 * PAGE] == bytes(PAGE - 100)
    _all_complete_once(env.kernel)


async def test_huge_read_length_does_not_allocate_its_length(env):
    """A READ of 1 GiB on a 5-page blob: memory stays bounded; answered once; serving goes on."""
    blob, source = _ingest(env, 5 * PAGE)
    obj = await env.kernel.open(b"data")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        outcome = env.kernel.send_read(obj, 0, 1 << 30)
        await asyncio.wait_for(outcome.done.wait(), GUARD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak >> 20} MiB for one READ"
    assert os.stat(obj.path).st_size <= 5 * PAGE + PAD_LIMIT  # no GiB of zeros on disk either
    assert env.kernel.cache_bytes(obj)[: 5 * PAGE] == source
    assert await env.kernel.read(obj, 0, PAGE, timeout=GUARD)
    _all_complete_once(env.kernel)


async def test_remount_of_a_cached_image_writes_nothing(env):
    """The cache file of a bootstrap is full after the first mount: the second prefill writes 0."""
    env.kernel.layout = True  # one cache file per cookie, kept across OPENs as cachefiles does
    blob, source = _ingest(env, (3 << 20) + 5000)
    env.store.put_image(Image("boot", blob.blob_id))  # the image's own name: a bootstrap
    first = await env.kernel.open(b"boot", b"erofs,boot")
    await _until(lambda: _events(env, "prefilled"), GUARD)
    assert _events(env, "prefilled")[0]["bytes"] == -(-blob.size // PAGE) * PAGE
    env.kernel.close(first)
    await _until(lambda: not env.kernel.fd_open(first), GUARD)

    second = await env.kernel.open(b"boot", b"erofs,boot")
    assert second.path == first.path
    await _until(lambda: len(_events(env, "prefilled")) == 2, GUARD)
    again = _events(env, "prefilled")[1]
    assert (again["outcome"], again["bytes"]) == ("ok", 0)
    assert env.kernel.cache_bytes(second)[: blob.size] == source


async def test_prefill_of_a_plain_image_writes_only_its_metadata(env):
    """A plain mkfs.erofs image is its own bootstrap: prefill writes its metadata, not its data.

    The file's data stays a hole for the kernel's READs to fill (and to overtake the prefill).
    """
    src = env.tmp / "src"
    (src / "d").mkdir(parents=True)
    big = random.Random(7).randbytes(3 << 20)
    (src / "big").write_bytes(big)
    for i in range(40):
        (src / "d" / f"f{i}").write_text(f"file {i}\n" * i)
    img = env.tmp / "plain.img"
    subprocess.run(["mkfs.erofs", str(img), str(src)], check=True, capture_output=True)
    import_image(env.store, "plain", img, [])
    data = img.read_bytes()
    at = data.find(big[:PAGE])

    obj = await env.kernel.open(b"plain", b"erofs,plain")
    assert obj.copen_result == len(data)
    await _until(lambda: _events(env, "prefilled"), GUARD)
    (line,) = _events(env, "prefilled")
    assert line["outcome"] == "ok" and line["note"].startswith("metadata")
    assert 0 < line["bytes"] <= len(data) - len(big)  # never a byte of the file
    assert env.kernel.range_present(obj, 0, PAGE)  # the superblock
    assert not env.kernel.range_present(obj, at, PAGE)  # file data: a hole
    assert await env.kernel.read(obj, at, len(big), timeout=GUARD)
    assert env.kernel.cache_bytes(obj)[at : at + len(big)] == big
    _all_complete_once(env.kernel)
