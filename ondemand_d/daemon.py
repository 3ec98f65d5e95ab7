# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d serve` as a process: device set-up, signals, systemd, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from typing import Any

import structlog

from ondemand_d import _native, systemd
from ondemand_d.config import Config
from ondemand_d.device import Device, raise_nofile_limit
from ondemand_d.service import Service
from ondemand_d.store.fetch import ChunkFetcher, RemoteSource
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk

log = structlog.get_logger()

FDSTORE_NAME = "cachefiles"


def open_device(cfg: Config) -> tuple[Device, bool]:
    """The devnode: adopted from systemd's fd store (then `restore`), or opened and bound.

    Returns:
        (device, restored): restored is True when a previous instance's device was adopted.
    """
    inherited = systemd.listen_fds().get(FDSTORE_NAME)
    if inherited is not None:
        os.set_blocking(inherited, False)
        device = Device(inherited, cfg.device)
        # Requests the previous instance read but never answered are queued again.
        device.restore()
        return device, True
    device = Device.open(cfg.device)
    try:
        device.bind(cfg.cache_dir, cfg.tag)
    except BaseException:
        device.close()
        raise
    # Keep the bound device across a crash or restart (Linux 6.8+ failover).
    systemd.store_fd(device.fd, FDSTORE_NAME)
    return device, False


class LazyRemoteSource:
    """The registry source, created on the first remote chunk.

    The HTTP stack costs 0.4 s of start-up on the host and seconds under
    emulation; a daemon that serves only local images never pays for it.
    """

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._source: Any = None

    def _get(self) -> Any:
        if self._source is None:
            from ondemand_d.registry.source import make_source  # noqa: PLC0415

            self._source = make_source(self._cfg)
        return self._source

    async def fetch(self, blob: Blob, chunks: Sequence[Chunk]) -> list[bytes]:
        return await self._get().fetch(blob, chunks)  # type: ignore[no-any-return]

    def prefetching(self) -> Any:
        """The source's low-priority context for whole-blob prefetch."""
        return self._get().prefetching()

    def stats(self) -> dict[str, int]:
        return {} if self._source is None else dict(self._source.stats())

    async def aclose(self) -> None:
        if self._source is not None:
            await self._source.aclose()


def make_remote_source(cfg: Config) -> RemoteSource:
    """The source for chunks that live in OCI registries."""
    return LazyRemoteSource(cfg)


async def serve(cfg: Config, device: Any = None, stop: asyncio.Event | None = None) -> Service:
    """Run the daemon until `stop` is set (or SIGTERM/SIGINT); return the finished Service."""
    raise_nofile_limit()
    store = LocalStore(cfg.store)
    restored = False
    owned = device is None  # close only a device we opened
    if device is None:
        device, restored = open_device(cfg)
    backend = _native.load_backend(None if cfg.native == "auto" else cfg.native)
    executor = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="ondemand-io")
    remote = make_remote_source(cfg)
    fetcher = ChunkFetcher(store, executor, remote, write_through=cfg.write_through)
    service = Service(
        device, store, fetcher, backend, executor,
        concurrency=cfg.concurrency,
        prefill_bootstrap=cfg.prefill_bootstrap,
        prefetch=cfg.prefetch,
        readahead=cfg.readahead,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _install_signals(loop, stop)
    service.start()
    log.info(
        "ready", device=str(cfg.device), cache_dir=str(cfg.cache_dir), tag=cfg.tag,
        store=str(cfg.store), backend=backend.name, concurrency=cfg.concurrency,
        restored=restored, pid=os.getpid(),
    )
    systemd.notify(f"READY=1\nSTATUS=serving from {cfg.store}")
    status = loop.create_task(_report_status(service))
    try:
        await stop.wait()
    finally:
        status.cancel()
        systemd.notify("STOPPING=1")
        log.info("stopping", in_flight=service.objects.reads_in_flight)
        await service.drain(cfg.shutdown_timeout)
        remote_stats: dict[str, Any] = {}
        if remote is not None:
            stats = getattr(remote, "stats", None)
            remote_stats = stats() if stats is not None else {}
            await remote.aclose()
        executor.shutdown(wait=True)
        if owned:
            device.close()
        log.info("stopped", **vars(service.counters), **remote_stats)
    return service


def _install_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)


async def _report_status(service: Service) -> None:
    """STATUS= for `systemctl status`, and the watchdog ping when one is armed."""
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    period = min(5.0, watchdog_usec / 2e6) if watchdog_usec else 5.0
    while True:
        await asyncio.sleep(period)
        systemd.notify(f"STATUS={service.status()}" + ("\nWATCHDOG=1" if watchdog_usec else ""))


def run(cfg: Config) -> int:
    """Serve on uvloop when it is installed; return the process exit code."""
    try:
        import uvloop  # noqa: PLC0415

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(cfg))
    return 0
