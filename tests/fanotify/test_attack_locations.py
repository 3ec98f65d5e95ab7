# SPDX-License-Identifier: Apache-2.0
"""Attack, fanotify front end: the first image to add a blob does not choose the victim's registry.

One image is published under two registry names (two proxies in front of one
registry): A, the attacker's, added first, and B, the victim's. The victim's
mount reads every file exactly and A sees none of its requests; after the
attacker's image is removed (rm + gc, the daemon running), the victim mounts
and reads again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ondemand_d import cli
from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.store.local import LocalStore

from ..registry._proxy import FaultProxy
from ..registry._server import Registry, start_registry, stop_registry
from .conftest import Daemon, build, tree
from .test_mount import make_tree


def blob_gets(proxy: FaultProxy) -> int:
    return sum(1 for s in proxy.seen if s.method == "GET" and "/blobs/sha256:" in s.path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    stop_registry(reg)


@pytest.fixture
async def proxies(registry: Registry) -> AsyncIterator[tuple[FaultProxy, FaultProxy]]:
    a = await FaultProxy(registry.host).start()
    b = await FaultProxy(registry.host).start()
    yield a, b
    await a.stop()
    await b.stop()


async def test_attack_fanotify_victim_reads_only_its_own_registry(
        daemon: Daemon, workdir: Path, registry: Registry,
        proxies: tuple[FaultProxy, FaultProxy]) -> None:
    """Every file of the victim's mount is exact and came from B; A saw no blob request."""
    a, b = proxies
    src = make_tree(workdir / "src", seed=21)
    origin = workdir / "origin"
    build(origin, src, "app", "--chunk-size", "64K")
    async with RegistryClient(RegistryConfig()) as client:
        for repo in ("atk/app", "vic/app"):
            await push(LocalStore(origin), "app", reference.parse(f"{registry.host}/{repo}:v1"),
                       client)
        await add(LocalStore(daemon.store), reference.parse(f"{a.host}/atk/app:v1"), client,
                  name="attacker")
        await add(LocalStore(daemon.store), reference.parse(f"{b.host}/vic/app:v1"), client,
                  name="victim")
    a.seen.clear()
    b.seen.clear()
    mnt = workdir / "victim"
    await asyncio.to_thread(daemon.mount, "victim", mnt)
    assert await asyncio.to_thread(tree, mnt) == tree(src)
    assert blob_gets(a) == 0
    assert blob_gets(b) > 0

    assert cli.main(["--store", str(daemon.store), "rm", "attacker"]) == 0
    assert cli.main(["--store", str(daemon.store), "gc"]) == 0
    await asyncio.to_thread(daemon.umount, mnt)
    again = workdir / "again"  # a new domain: new blob files, filled anew
    await asyncio.to_thread(daemon.mount, "victim", again, "again")
    assert await asyncio.to_thread(tree, again) == tree(src)
    assert blob_gets(a) == 0
