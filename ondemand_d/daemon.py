# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d serve` as a process: device set-up, signals, systemd, shutdown."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from ondemand_d import _native, faults, systemd
from ondemand_d.config import Config
from ondemand_d.device import Device, KernelFeatures, kernel_features, raise_nofile_limit
from ondemand_d.errors import DeviceError, OndemandError
from ondemand_d.fill import CacheLimit
from ondemand_d.service import Service
from ondemand_d.store.fetch import ChunkFetcher, RemoteSource
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Chunk
from ondemand_d.volume_images import FILE_NAME as VOLUME_IMAGES, VolumeImages

log = structlog.get_logger()

FDSTORE_NAME = "cachefiles"
#: Verified chunks kept for READs that want them again (across images: a chunk two
#: blobs share). The kernel does not ask twice for what it was given, so few ever
#: hit; the fetcher's 64 MiB default was most of the daemon's RSS after a few images.
RECENT_CHUNKS = 4 << 20
DEFAULT_DEVICE = Path("/dev/cachefiles")


def open_device(cfg: Config) -> tuple[Device, bool]:
    """The devnode: adopted from systemd's fd store, or opened, bound and stored there.

    Returns:
        (device, adopted): adopted is True when a previous instance's device was handed over.
    """
    inherited = systemd.listen_fds().get(FDSTORE_NAME)
    if inherited is not None:
        os.set_blocking(inherited, False)
        return Device(inherited, cfg.device), True
    device = Device.open(cfg.device)
    try:
        device.bind(cfg.cache_dir, cfg.tag)
    except BaseException:
        device.close()
        raise
    return device, False


def start_device(device: Any, adopted: bool) -> KernelFeatures:  # noqa: FBT001
    """Send `restore` (which also tells whether the kernel has failover); say once if not.

    On an adopted device it makes the kernel resend the requests the dead instance
    had read but not answered. On a fresh one nothing was read yet, so it only probes;
    `serve` then stores the device in systemd's fd store only if a successor can use it.

    A kernel without `restore` (before 6.8) still serves new mounts through the same
    device, so the daemon keeps serving and says once what is lost. It keeps the device
    out of the fd store (and drops an inherited one from it): a stored device would
    outlive a crash with the dead instance's requests taken and never answered, and
    their readers would wait until the device is closed. Unstored, a crash closes it:
    those readers get EIO at once, and the next instance binds afresh.
    """
    restore = device.try_restore()
    if not restore:
        if adopted:
            systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={FDSTORE_NAME}")
        log.warning(
            "restore_unsupported", adopted=adopted,
            consequence=("requests and images of the previous instance are lost: remount "
                         "the images mounted before this restart") if adopted else
            "a restarted daemon cannot take over mounted images (failover needs Linux 6.8+)",
            fd_store="not used: a crash closes the device, so no reader waits on a dead daemon",
        )
    return kernel_features(restore)


class LazyRemoteSource:
    """The registry source, created on the first remote chunk or by `warm_up`.

    The HTTP stack costs 0.15-0.3 s of start-up on the host and 4.6 s in the
    TCG guest, almost all of it importing aiohttp (bench/bench_client_setup.py);
    a daemon that serves only local images never pays for it, and one whose
    store holds registry blobs pays it in the background after `ready`
    instead of in its first remote READ.
    """

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._source: Any = None
        self._lock = threading.Lock()  # warm_up runs in a thread

    def _get(self) -> Any:
        with self._lock:
            if self._source is None:
                from ondemand_d.registry.source import make_source  # noqa: PLC0415

                self._source = make_source(self._cfg)  # its [registry] table
            return self._source

    def warm_up(self, store: LocalStore) -> bool:
        """Create the source now if `store` has registry blobs (blocking: run in a thread)."""
        if self._source is None and any(store.get_blob(b).is_remote for b in store.blob_ids()):
            self._get()
            return True
        return False

    async def fetch(self, blob: Blob, chunks: Sequence[Chunk]) -> list[bytes]:
        # Imported in a thread (or waited for, if warm_up is at it): the loop
        # keeps serving other READs meanwhile.
        source = self._source or await asyncio.to_thread(self._get)
        return await source.fetch(blob, chunks)  # type: ignore[no-any-return]

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


def _open_store(cfg: Config) -> Any:
    if cfg.images_dir is None:
        return LocalStore(cfg.store.absolute())  # `cull` changes the cwd for a moment
    from ondemand_d.imagesdir import ImagesDir  # noqa: PLC0415

    store = ImagesDir(cfg.images_dir, max_size=cfg.images_max_size)
    log.warning("images_unverified", images=str(store.root),
                note="serving image files as they are: nothing is verified in this mode")
    return store


async def serve(
    cfg: Config, device: Any = None, stop: asyncio.Event | None = None, *,
    fanotify: bool | None = None,
) -> Service:
    """Run the daemon until `stop` is set (or SIGTERM/SIGINT); return the finished Service.

    Two front ends: fscache (/dev/cachefiles, when the kernel has it) and fanotify
    (file-backed mounts, when pre-content events work; by default only when no
    `device` is given, as under `ondemand-d serve`).
    """
    raise_nofile_limit()
    adopted = False
    owned = device is None  # close only a device we opened
    fan = _fanotify_check(cfg) if (device is None if fanotify is None else fanotify) else None
    if device is None:
        device, adopted = _open_device(cfg, fan)
    fscache = not getattr(device, "absent", False)
    try:  # created only once the device is ours: a failed start leaves no empty store behind
        store = _open_store(cfg)
    except BaseException:
        if owned:
            device.close()
        raise
    features = start_device(device, adopted) if fscache else kernel_features(restore=False)
    if owned and fscache and not adopted and features.restore:
        # Keep the bound device across a crash or restart (Linux 6.8+ failover).
        systemd.store_fd(device.fd, FDSTORE_NAME)
    restored = adopted and features.restore
    backend = faults.wrap_backend(
        _native.load_backend(None if cfg.native == "auto" else cfg.native))
    _native.POOL.keep = max(_native.POOL.keep, cfg.io_threads)  # a buffer per I/O thread
    executor = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="ondemand-io")
    remote = make_remote_source(cfg)
    fetcher = ChunkFetcher(store, executor, remote, write_through=cfg.write_through,
                           deadline=cfg.registry.fetch_deadline, cache_bytes=RECENT_CHUNKS,
                           local_timeout=cfg.local_read_timeout)
    service = Service(
        device, store, fetcher, backend, executor,
        concurrency=cfg.concurrency,
        prefill_bootstrap=cfg.prefill_bootstrap,
        prefetch=cfg.prefetch,
        readahead=cfg.readahead,
        max_bootstrap=cfg.max_bootstrap,
        cache_limit=(CacheLimit(cfg.cache_dir, cfg.cache_max, device.command if fscache else None)
                     if cfg.cache_max else None),
        volumes=_volume_images(cfg, restored) if fscache else None,
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    _install_signals(loop, stop)
    # Before the first request: the control socket's counters see every line.
    control = await start_control(
        cfg, service, device, features, restored=restored, backend=backend.name)
    service.start()
    faults.arm(service)
    frontend = _fanotify_start(cfg, fan, store, fetcher, executor, control)
    log.info(
        "ready", frontends=[*(["fscache"] if fscache else []), *(["fanotify"] if frontend else [])],
        # The device only when it is served: a host without /dev/cachefiles is not told of it.
        **({"device": str(cfg.device)} if fscache else {}), cache_dir=str(cfg.cache_dir),
        tag=cfg.tag, store=str(cfg.store), backend=backend.name, concurrency=cfg.concurrency,
        restored=restored, adopted=adopted, restore=features.restore, pid=os.getpid(),
    )
    # The first watchdog ping with READY: the loop has just started taking requests.
    ping = "\nWATCHDOG=1" if systemd.watchdog_usec() else ""
    systemd.notify(f"READY=1\nSTATUS=serving from {cfg.store}{ping}")
    warm_up = getattr(remote, "warm_up", None)
    warming = loop.run_in_executor(None, warm_up, store) if warm_up is not None else None
    status = loop.create_task(_report_status(
        service, cfg.hung_read_after, fscache=fscache, fanotify=frontend))
    try:
        await stop.wait()
    finally:
        status.cancel()
        if warming is not None:
            with contextlib.suppress(Exception):  # best effort: the first READ would do it
                await warming
        systemd.notify("STOPPING=1")
        log.info("stopping", in_flight=service.objects.reads_in_flight)
        if frontend is not None:  # unmounts first: the group must outlive every mount
            await frontend.stop(cfg.shutdown_timeout)
        await service.drain(cfg.shutdown_timeout)
        if control is not None:
            await control.stop()
        remote_stats: dict[str, Any] = {}
        if remote is not None:
            stats = getattr(remote, "stats", None)
            remote_stats = stats() if stats is not None else {}
            await remote.aclose()
        if fetcher.stuck_reads:
            # A thread stuck in the kernel cannot be interrupted: serve ends without it (the
            # interpreter still waits for it at exit; a service manager's stop timeout ends that).
            log.warning("stuck_local_reads", threads=fetcher.stuck_reads,
                        error="I/O threads are still stuck in reads of the store")
        executor.shutdown(wait=not fetcher.stuck_reads, cancel_futures=bool(fetcher.stuck_reads))
        if owned:
            device.close()
        log.info("stopped", **vars(service.counters), **remote_stats)
    return service


def _volume_images(cfg: Config, restored: bool) -> VolumeImages:  # noqa: FBT001
    """Each volume's mount order, beside cache/ and graveyard/: a successor that took over
    the device (restored) reads its predecessor's; a fresh bind starts without (the
    kernel's objects of before are gone, and so are their mounts)."""
    path = cfg.cache_dir / VOLUME_IMAGES
    return VolumeImages.load(path) if restored else VolumeImages(path)


def _fanotify_check(cfg: Config) -> Any:
    from ondemand_d.fanotify import serving  # noqa: PLC0415 - only where it is used

    return serving.check(cfg)


class NoErofsFscache(DeviceError):
    """/dev/cachefiles exists, but this kernel's EROFS cannot mount by fsid."""


def _check_erofs_fscache() -> None:
    from ondemand_d.fanotify.syscalls import erofs_takes  # noqa: PLC0415 - ctypes, here only

    if erofs_takes("fsid", "probe") is False:  # None (cannot ask): let the device decide
        msg = ("/dev/cachefiles exists, but this kernel's EROFS cannot mount by fsid (no "
               "CONFIG_EROFS_FS_ONDEMAND, or Linux 7.2+, which removed EROFS over fscache): "
               "serve file-backed mounts with the fanotify front end (ondemand-d mount)")
        raise NoErofsFscache(msg)


def _open_device(cfg: Config, fan: Any) -> tuple[Any, bool]:
    """open_device; without /dev/cachefiles, a stand-in when the fanotify front end works.

    /dev/cachefiles alone is not enough: EROFS must still mount by `fsid` (Linux 7.2 removed
    EROFS over fscache and keeps the device), or the fscache front end serves nothing.
    """
    try:
        if cfg.device == DEFAULT_DEVICE and cfg.device.exists():
            _check_erofs_fscache()
        return open_device(cfg)
    except DeviceError as exc:
        # Only the kernel's own devnode being absent means "no fscache here"; a --device
        # that is wrong, busy or not the device is a mistake to report.
        if fan is None or cfg.device != DEFAULT_DEVICE or (
                cfg.device.exists() and not isinstance(exc, NoErofsFscache)):
            raise
        if not fan.probe.available:
            msg = f"{exc}; the fanotify front end is not available either: {fan.probe.reason}"
            raise DeviceError(msg) from exc
        from ondemand_d.fanotify.serving import NoDevice  # noqa: PLC0415

        log.warning("frontend_unavailable", frontend="fscache", reason=str(exc),
                    consequence="serving fanotify mounts only (ondemand-d mount)")
        return NoDevice(), False


def _fanotify_start(  # noqa: PLR0913 - what the front end shares with the service
    cfg: Config, fan: Any, store: Any, fetcher: ChunkFetcher, executor: ThreadPoolExecutor,
    control: Any,
) -> Any:
    """Start the fanotify front end if it was probed and works; tell the control socket."""
    if fan is None:
        return None
    frontend = None
    if fan.probe.available:
        from ondemand_d.fanotify import serving  # noqa: PLC0415

        frontend = serving.start(cfg, fan, store, fetcher, executor)
    else:
        # Info, not a warning: fscache serves (without it, serve failed before this).
        log.info("frontend_unavailable", frontend="fanotify", reason=fan.probe.reason)
    if control is not None:
        rt = control.state["runtime"]
        if frontend is not None:  # every event's line for `trace`, whatever the log level
            frontend.on_answer = control.observer.publish
        rt.frontends["fanotify"] = frontend
        rt.frontends["fanotify_unavailable"] = None if frontend else fan.probe.reason
    return frontend


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
    # `systemctl reload` (ExecReload= sends SIGHUP): by default SIGHUP ends the process, and
    # systemd counts that as a clean exit, so Restart=on-failure would not bring it back and
    # the mounts would lose their daemon. Nothing here can change while serving: say so.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
            "reload_ignored", signal="SIGHUP",
            hint="settings apply at start: `systemctl restart ondemand-d` (mounts stay up)"))


def status_line(service: Service, *, fscache: bool, fanotify: Any) -> str:
    """STATUS=: the counters of the front ends that run (fscache's, fanotify's or both)."""
    parts = [service.status()] if fscache else []
    if fanotify is not None:
        c = fanotify.counters
        parts.append(f"fanotify: mounts={len(fanotify.mounts)} events={c.events} "
                     f"fills={c.fills} bytes_filled={fanotify.filler.bytes_filled} "
                     f"denied={c.denied}")
    return "; ".join(parts)


async def _report_status(service: Service, hung_after: float, *, fscache: bool = True,
                         fanotify: Any = None) -> None:
    """STATUS= for `systemctl status`, hung READs in the log, and the watchdog ping.

    WATCHDOG=1 goes out only while the request loop is alive (watchdog.Liveness), so
    systemd restarts a daemon that stopped serving even though its event loop runs.
    """
    from ondemand_d.control.inflight import HungReads  # noqa: PLC0415
    from ondemand_d.watchdog import Liveness  # noqa: PLC0415

    watchdog_usec = systemd.watchdog_usec()
    period = min(5.0, watchdog_usec / 2e6) if watchdog_usec else 5.0
    liveness = Liveness(service, hung_after)
    hung = HungReads(service, hung_after)
    while True:
        await asyncio.sleep(period)
        hung.scan()
        ping = bool(watchdog_usec) and liveness.check()
        status = status_line(service, fscache=fscache, fanotify=fanotify)
        systemd.notify(f"STATUS={status}" + ("\nWATCHDOG=1" if ping else ""))


async def start_control(  # noqa: PLR0913 - what the views show
    cfg: Config, service: Service, device: Any, features: KernelFeatures, *, restored: bool,
    backend: str,
) -> Any:
    """The control socket, or None when it is off or cannot be served (said in the log)."""
    if cfg.control_socket is None:
        return None
    from ondemand_d.control import views  # noqa: PLC0415 - aiohttp only when serving it

    try:
        return await views.start(cfg, service, device, features, restored=restored,
                                 backend=backend)
    except OndemandError as exc:
        log.error("control_unavailable", socket=str(cfg.control_socket), error=str(exc))
        return None


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
