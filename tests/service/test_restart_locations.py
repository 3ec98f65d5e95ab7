# SPDX-License-Identifier: Apache-2.0
"""`serve` keeps each volume's mount order in the cache directory for its successor."""
from __future__ import annotations

import asyncio

from fakekernel import FakeKernel
from ondemand_d import daemon
from ondemand_d.config import load
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Image
from ondemand_d.volume_images import FILE_NAME, VolumeImages


async def test_serve_saves_the_mount_order_before_answering_and_a_successor_loads_it(
        tmp_path, monkeypatch):
    """The bootstrap's OPEN is answered only once the order is on disk; a serve that takes
    over the device (restored) starts with it; one that binds afresh starts without (the
    mounts of before are gone with the kernel's objects)."""
    store = LocalStore(tmp_path / "store")
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode() * 5000)
        store.put_image(Image(name, store.ingest_file(tmp_path / name).blob_id))
    cache = tmp_path / "cache"
    cache.mkdir()
    cfg = load(None, {}, {"store": str(tmp_path / "store"), "cache_dir": str(cache),
                          "native": "python", "control_socket": ""})
    known = []
    for round_, adopted in enumerate((False, True, False)):
        (tmp_path / f"objects{round_}").mkdir()
        kernel = FakeKernel(tmp_path / f"objects{round_}")
        kernel.start()
        monkeypatch.setattr(daemon, "open_device", lambda cfg, k=kernel, a=adopted: (
            k.device(), a))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.serve(cfg, None, stop))
        if round_ == 0:
            for name in (b"b", b"a"):
                assert (await kernel.open(name, b"erofs,dom")).copen_result == 5000
                assert VolumeImages.load(cache / FILE_NAME).opened(b"erofs,dom")[-1] == \
                    name.decode()
        stop.set()
        service = await asyncio.wait_for(task, 10)
        kernel.stop()
        known.append(service.volumes.opened(b"erofs,dom"))
    assert known == [("b", "a"), ("b", "a"), ()]
