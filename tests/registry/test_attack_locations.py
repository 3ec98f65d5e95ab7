# SPDX-License-Identifier: Apache-2.0
"""Attack: a tenant adds a copy of a public image first, from a registry it controls.

The same image content is published twice, under two registry names (two proxies
in front of one registry): A is the attacker's, B the victim's. The attacker's
copy is added first, so the store's blob records carry A. The victim's reads
must all go to B (A sees none of them, even while it stalls a fetch of the very
same chunk), return the right bytes, and keep working once the attacker's
image is removed (rm + gc). The fscache front end is driven by the fake kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from fakekernel import FakeKernel, FakeObject, RecordingBackend

from ondemand_d import cli
from ondemand_d._native import load_backend
from ondemand_d.device import Device
from ondemand_d.importer import import_image
from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource
from ondemand_d.service import Service
from ondemand_d.store import gc
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore
from ondemand_d.store.locations import LOCATIONS, image_location, locate
from ondemand_d.store.model import Blob, Image
from ondemand_d.volume_images import VolumeImages

from ..service.test_control import Running
from ._proxy import Fault, FaultProxy
from ._server import Registry
from .conftest import BOUND_S, blob_bytes, make_image

#: A fetch that waits on the stalled registry gives up after this long (it is
#: the bound of the attacker's READ, never a wait of the victim's).
DEADLINE_S = 4.0
CONFIG = RegistryConfig(read_timeout=30, request_timeout=30, retries=0, backoff_base=0.01,
                        backoff_max=0.05, fetch_deadline=DEADLINE_S)


@dataclass
class Setup:
    store: LocalStore
    attacker: FaultProxy  # registry A
    victim: FaultProxy  # registry B
    blob: Blob  # the shared data blob, as its record stands (the attacker's, added first)
    data: bytes  # its true bytes


def blob_gets(proxy: FaultProxy) -> int:
    return sum(1 for s in proxy.seen if s.method == "GET" and "/blobs/sha256:" in s.path)


@pytest.fixture
async def setup(registry: Registry, tmp_path: Path) -> AsyncIterator[Setup]:
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "app", (8192, 700_000))
    a = await FaultProxy(registry.host).start()
    b = await FaultProxy(registry.host).start()
    try:
        store = LocalStore(tmp_path / "dst")
        async with RegistryClient(RegistryConfig()) as client:
            for repo in ("atk/app", "vic/app"):  # one content, two names
                await push(src, "app", reference.parse(f"{registry.host}/{repo}:v1"), client)
            await add(store, reference.parse(f"{a.host}/atk/app:v1"), client, name="attacker")
            await add(store, reference.parse(f"{b.host}/vic/app:v1"), client, name="victim")
        blob_id = image.devices[0][1]
        blob = store.get_blob(blob_id)
        assert blob.extra["remote"]["registry"] == a.host  # the record is the attacker's
        a.seen.clear()
        b.seen.clear()
        yield Setup(store, a, b, blob, blob_bytes(src, blob_id))
    finally:
        await a.stop()
        await b.stop()


@contextlib.asynccontextmanager
async def serving(store: LocalStore, cache: Path,
                  state: Path | None = None) -> AsyncIterator[FakeKernel]:
    """A daemon (Service + RegistrySource, no write-through: every miss is fetched);
    `state` is the file a daemon keeps its volumes' mount order in across restarts."""
    cache.mkdir(exist_ok=True)
    kernel = FakeKernel(cache)
    kernel.start()
    executor = ThreadPoolExecutor(2)
    source = RegistrySource(CONFIG)
    fetcher = ChunkFetcher(store, executor, source, deadline=DEADLINE_S)
    backend = RecordingBackend(load_backend("python"), kernel)
    service = Service(Device(kernel.device_fd, Path("fake")), store, fetcher, backend, executor,
                      volumes=VolumeImages.load(state) if state else None)
    service.start()
    try:
        yield kernel
    finally:
        await service.drain(5)
        kernel.stop()
        executor.shutdown()
        await source.aclose()


async def mount(kernel: FakeKernel, image: str, blob: Blob) -> FakeObject:
    """What an erofs mount of `image` (no domain) opens: its bootstrap, then the data blob."""
    volume = b"erofs," + image.encode()
    assert (await kernel.open(image.encode(), volume)).copen_result > 0
    obj = await kernel.open(blob.blob_id.encode(), volume)
    assert obj.copen_result == blob.size
    return obj


async def read_all(kernel: FakeKernel, obj: FakeObject, blob: Blob) -> bytes:
    for c in blob.chunks:
        assert await kernel.read(obj, c.offset, c.length, timeout=BOUND_S), c
    return kernel.cache_bytes(obj)[: blob.size]


async def test_attack_victim_reads_never_reach_the_first_adders_registry(
        setup: Setup, tmp_path: Path) -> None:
    """Every byte the victim reads comes from B, exact; A sees no request."""
    async with serving(setup.store, tmp_path / "cache") as kernel:
        obj = await mount(kernel, "victim", setup.blob)
        assert await read_all(kernel, obj, setup.blob) == setup.data
    assert blob_gets(setup.attacker) == 0
    assert blob_gets(setup.victim) > 0


async def test_attack_a_stalled_fetch_of_the_same_chunk_does_not_hold_the_victim(
        setup: Setup, tmp_path: Path) -> None:
    """The attacker's READ of chunk 3 hangs on A; the victim's READ of it is served from B."""
    setup.attacker.add(Fault("delay", times=10**6, seconds=600))
    target = setup.blob.chunks[3]
    async with serving(setup.store, tmp_path / "cache") as kernel:
        mine = await mount(kernel, "attacker", setup.blob)
        stalled = kernel.send_read(mine, target.offset, target.length)
        while blob_gets(setup.attacker) == 0:  # the attacker's fetch is on A's wire now
            await asyncio.sleep(0.01)
        theirs = await mount(kernel, "victim", setup.blob)
        assert await kernel.read(theirs, target.offset, target.length, timeout=BOUND_S)
        got = kernel.cache_bytes(theirs)[target.offset: target.end]
        assert got == setup.data[target.offset: target.end]
        await asyncio.wait_for(stalled.done.wait(), BOUND_S)
        assert stalled.present is False  # A really stalled: the attacker's own READ failed
    assert blob_gets(setup.attacker) == 1  # the attacker's request, no other
    assert blob_gets(setup.victim) == 1


async def test_attack_removing_the_attackers_image_leaves_the_victim_working(
        setup: Setup, tmp_path: Path) -> None:
    """rm attacker + gc keeps the victim's blob and location; it reads all from B."""
    gc.rm(setup.store, ["attacker"])
    report = gc.gc(setup.store)
    assert report.locations == 1  # the attacker's location record, not the victim's
    assert report.blobs == 0  # the victim still names the shared blobs
    assert len(setup.store.location_ids()) == 1
    async with serving(setup.store, tmp_path / "cache") as kernel:
        obj = await mount(kernel, "victim", setup.blob)
        assert await read_all(kernel, obj, setup.blob) == setup.data
    assert blob_gets(setup.attacker) == 0
    assert blob_gets(setup.victim) > 0


async def test_attack_an_object_no_mount_explains_is_not_fetched_from_either(
        setup: Setup, tmp_path: Path) -> None:
    """A data blob opened before any bootstrap of its volume (e.g. after a restart), which
    two images locate differently, reads EIO: it goes to neither registry."""
    async with serving(setup.store, tmp_path / "cache") as kernel:
        obj = await kernel.open(setup.blob.blob_id.encode(), b"erofs,somewhere")
        first = setup.blob.chunks[0]
        assert not await kernel.read(obj, first.offset, first.length, timeout=BOUND_S)
    assert blob_gets(setup.attacker) == 0
    assert blob_gets(setup.victim) == 0


def test_attack_images_without_locations_read_their_blob_records_location(
        setup: Setup) -> None:
    """A store written before locations: an image naming none uses its blob record's
    location (migration on read, nothing rewritten); one naming its own uses that."""
    victim = setup.store.get_image("victim")
    old = Image(victim.name, victim.bootstrap, victim.devices,
                {k: v for k, v in victim.extra.items() if k != LOCATIONS})
    legacy = image_location(setup.store, old, setup.blob)
    assert legacy.extra["remote"]["registry"] == setup.attacker.host  # the record's (first adder)
    assert [c.remote.blob for c in legacy.chunks if c.remote] == [
        c.remote.blob for c in setup.blob.chunks if c.remote]
    own = locate(setup.store, setup.blob, ["victim"])
    assert own.extra["remote"] == {"registry": setup.victim.host, "repository": "vic/app"}
    assert all(c.remote is not None and c.remote.registry == setup.victim.host
               for c in own.chunks)


async def test_in_one_share_domain_the_first_mount_that_uses_a_blob_locates_it(
        setup: Setup, tmp_path: Path) -> None:
    """One domain, victim mounted first: the shared object is fetched from B only (mount
    order decides in a domain; tenants that do not trust each other get their own domains)."""
    volume = b"erofs,shared"
    async with serving(setup.store, tmp_path / "cache") as kernel:
        for image in (b"victim", b"attacker"):
            assert (await kernel.open(image, volume)).copen_result > 0
        obj = await kernel.open(setup.blob.blob_id.encode(), volume)
        assert await read_all(kernel, obj, setup.blob) == setup.data
    assert blob_gets(setup.attacker) == 0
    assert blob_gets(setup.victim) > 0


@pytest.mark.parametrize("order", [("victim", "attacker"), ("attacker", "victim")])
async def test_a_restarted_daemon_locates_a_reopened_blob_as_its_predecessor_did(
        setup: Setup, tmp_path: Path, order: tuple[str, str]) -> None:
    """One domain, two images that disagree on the blob's registry. After a restart the
    kernel re-sends the data blob's OPEN before any bootstrap's (a bootstrap cached whole
    is never read, so never reopened): the successor reads every byte, exact, from the
    registry its predecessor chose (the first mount's), and nothing from the other."""
    volume, state = b"erofs,shared", tmp_path / "cache" / "volume-images.json"
    first, second = (setup.victim, setup.attacker) if order[0] == "victim" else (
        setup.attacker, setup.victim)
    head = setup.blob.chunks[0]
    async with serving(setup.store, tmp_path / "cache", state) as kernel:
        for image in order:
            assert (await kernel.open(image.encode(), volume)).copen_result > 0
        obj = await kernel.open(setup.blob.blob_id.encode(), volume)
        assert await kernel.read(obj, head.offset, head.length, timeout=BOUND_S)
    assert (blob_gets(first), blob_gets(second)) == (1, 0)
    async with serving(setup.store, tmp_path / "cache2", state) as kernel:  # the successor
        obj = await kernel.open(setup.blob.blob_id.encode(), volume)
        assert await read_all(kernel, obj, setup.blob) == setup.data
    assert blob_gets(first) > 1
    assert blob_gets(second) == 0


async def test_attack_an_imported_copy_never_fetches_from_the_registry_an_add_named(
        registry: Registry, tmp_path: Path) -> None:
    """An image imported here lists a data blob the attacker's `add` recorded first (same
    content): its chunks come from this store only. A chunk missing here is EIO, with a
    sentence saying why in the READ's log line, and the attacker's registry sees nothing."""
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_bytes(random.Random(3).randbytes(400_000))
    meta, data = tmp_path / "meta", tmp_path / "data"
    subprocess.run(["mkfs.erofs", "--chunksize=65536", f"--blobdev={data}", str(meta), str(src)],
                   check=True, capture_output=True)
    origin = LocalStore(tmp_path / "origin")
    import_image(origin, "app", meta, [(data, "app-data")], chunk_size=64 << 10)
    store = LocalStore(tmp_path / "dst")
    a = await FaultProxy(registry.host).start()
    try:
        async with RegistryClient(RegistryConfig()) as client:
            await push(origin, "app", reference.parse(f"{registry.host}/atk/imp:v1"), client)
            await add(store, reference.parse(f"{a.host}/atk/imp:v1"), client, name="attacker")
        mine = import_image(store, "mine", meta, [(data, "mine-data")], chunk_size=64 << 10)
        assert mine.extra[LOCATIONS] == {}
        blob = store.get_blob(mine.devices[0][1])
        assert blob.extra["remote"]["registry"] == a.host  # the record is the attacker's
        lost = blob.chunks[2]
        store.chunk_path(lost.digest).unlink()
        a.seen.clear()
        with capture_logs() as logs:
            async with serving(store, tmp_path / "cache") as kernel:
                assert (await kernel.open(b"mine", b"erofs,mine")).copen_result > 0
                obj = await kernel.open(b"mine-data", b"erofs,mine")
                head = blob.chunks[0]
                assert await kernel.read(obj, head.offset, head.length, timeout=BOUND_S)
                assert kernel.cache_bytes(obj)[: head.length] == data.read_bytes()[: head.length]
                assert not await kernel.read(obj, lost.offset, lost.length, timeout=BOUND_S)
        assert blob_gets(a) == 0
        (failed,) = [e for e in logs if e["event"] == "read_completed" and e["outcome"] == "eio"]
        assert "was built or imported here and reads only this store" in failed["error"]
    finally:
        await a.stop()


async def test_ls_status_and_gc_say_where_each_image_reads_from(
        setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ls` and `status` (text and JSON) show each image's own registry/repository, not the
    blob record's; `gc` says how many location records it removed (text and JSON)."""
    root = str(setup.store.root)
    mine, theirs = f"{setup.victim.host}/vic/app", f"{setup.attacker.host}/atk/app"
    assert cli.main(["--store", root, "ls", "--json"]) == 0
    listed = {i["name"]: i for i in json.loads(capsys.readouterr().out)["images"]}
    assert (listed["victim"]["locations"], listed["attacker"]["locations"]) == ([mine], [theirs])
    (data,) = [b for b in listed["victim"]["blobs"] if b["blob"] == setup.blob.blob_id]
    assert data["location"] == mine
    assert cli.main(["--store", root, "ls"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("victim ")]
    assert line.endswith(f"from {mine}")
    async with Running(tmp_path / "run", store=root) as d:
        assert await asyncio.to_thread(cli.main, ["status", "--socket", str(d.socket)]) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines()
                   if x.startswith("  victim ")]
        assert line.endswith(f", from {mine}")
        assert await asyncio.to_thread(
            cli.main, ["status", "--json", "--socket", str(d.socket)]) == 0
        shown = {i["name"]: i for i in json.loads(capsys.readouterr().out)["images"]}
    assert (shown["victim"]["locations"], shown["attacker"]["locations"]) == ([mine], [theirs])
    (data,) = [b for b in shown["victim"]["blobs"] if b["blob"] == setup.blob.blob_id]
    assert data["location"] == mine
    gc.rm(setup.store, ["attacker"])
    assert cli.main(["--store", root, "gc", "--dry-run"]) == 0
    assert "1 location record(s)" in capsys.readouterr().out
    assert cli.main(["--store", root, "gc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["locations"] == 1
    assert len(setup.store.location_ids()) == 1
