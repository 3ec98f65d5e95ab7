# SPDX-License-Identifier: Apache-2.0
"""Registry images through the fanotify front end: exact bytes, a stall, umount of a stall."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.store.local import LocalStore

from ..registry._proxy import Fault, FaultProxy
from ..registry._server import Registry, start_registry, stop_registry
from .conftest import Daemon, build, tree
from .test_mount import make_tree

WAIT_S = 60.0


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    stop_registry(reg)


@pytest.fixture
async def proxy(registry: Registry) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(registry.host).start()
    yield p
    await p.stop()


async def publish(src: Path, workdir: Path, registry: Registry, proxy: FaultProxy,
                  dst: Path, name: str) -> None:
    """Build `src` as `name`, push it, and add it to the daemon's store through the proxy."""
    origin = workdir / f"origin-{name}"
    build(origin, src, name, "--chunk-size", "64K")
    async with RegistryClient(RegistryConfig()) as client:
        await push(LocalStore(origin), name, reference.parse(f"{registry.host}/t/{name}:v1"),
                   client)
        await add(LocalStore(dst), reference.parse(f"{proxy.host}/t/{name}:v1"), client,
                  name=name)


async def pending_reads(daemon: Daemon, mountpoint: Path) -> int:
    st = await asyncio.to_thread(daemon.client.get, "/fanotify")
    return sum(b["pending"] for m in st["mounts"] if m["mountpoint"] == str(mountpoint)
               for b in m["blobs"])


async def test_registry_image_reads_byte_exact(daemon: Daemon, workdir: Path,
                                               registry: Registry, proxy: FaultProxy) -> None:
    """An image added from a registry is fetched on events, whole chunks, and reads exact."""
    src = make_tree(workdir / "src", seed=11)
    await publish(src, workdir, registry, proxy, daemon.store, "remote")
    proxy.blob_bytes = 0
    mnt = workdir / "mnt"
    await asyncio.to_thread(daemon.mount, "remote", mnt)
    assert await asyncio.to_thread(tree, mnt) == tree(src)
    assert proxy.blob_bytes > 0
    assert any(r["source"] == "remote" for r in daemon.reads())


async def test_stall_blocks_only_its_mount_and_umount_answers(
        daemon: Daemon, workdir: Path, registry: Registry, proxy: FaultProxy) -> None:
    """A stalled registry holds its reader only; umount answers it with EIO and unmounts."""
    src = make_tree(workdir / "src", seed=12)
    await publish(src, workdir, registry, proxy, daemon.store, "slow")
    local_src = make_tree(workdir / "local-src", seed=13)
    build(daemon.store, local_src, "local")
    slow, fast = workdir / "slow", workdir / "fast"
    await asyncio.to_thread(daemon.mount, "slow", slow)
    await asyncio.to_thread(daemon.mount, "local", fast)
    proxy.faults.append(Fault("delay", times=1000, seconds=120))
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"open({str(slow / 'large.bin')!r}, 'rb').read()",
        stderr=subprocess.PIPE)
    for _ in range(int(WAIT_S / 0.05)):
        if await pending_reads(daemon, slow):
            break
        await asyncio.sleep(0.05)
    assert await pending_reads(daemon, slow), "the reader never reached the daemon"
    # Meanwhile the other mount serves at once, however long the stall lasts.
    assert await asyncio.to_thread(tree, fast) == tree(local_src)
    assert reader.returncode is None  # still waiting for the registry
    done = await asyncio.to_thread(daemon.umount, slow)
    assert done["readers_answered"] >= 1
    _, err = await asyncio.wait_for(reader.communicate(), WAIT_S)
    assert reader.returncode != 0 and b"Input/output error" in err
    assert not slow.is_mount()
    assert await asyncio.to_thread(tree, fast) == tree(local_src)
