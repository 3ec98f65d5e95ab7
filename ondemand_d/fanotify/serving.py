# SPDX-License-Identifier: Apache-2.0
"""What `serve` asks of the fanotify front end: is it available, start it, stop it.

Kept apart from daemon.py so that the daemon's hooks are three calls.
"""
from __future__ import annotations

import os
from concurrent.futures import Executor
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from ondemand_d import systemd
from ondemand_d.config import Config
from ondemand_d.fanotify.fdstore import FDSTORE_FILE_PREFIX, FDSTORE_GROUP
from ondemand_d.fanotify.frontend import FanotifyFrontend
from ondemand_d.fanotify.holder import HolderClient, attach
from ondemand_d.fanotify.probe import Probe, probe
from ondemand_d.store.fetch import ChunkFetcher
from ondemand_d.store.local import LocalStore

log = structlog.get_logger()


@dataclass
class Startup:
    """The probe's verdict and what a previous instance left in the fd store."""

    probe: Probe
    group: int | None = None
    files: dict[str, int] = field(default_factory=dict)
    holder: HolderClient | None = None
    systemd_store: bool = False


def check(cfg: Config, environ: Mapping[str, str] | None = None) -> Startup:
    """Probe pre-content events (with an inherited group if there is one).

    Under systemd (NOTIFY_SOCKET) the fds come from and go to its fd store; without
    it, from and to this cache directory's fd holder (started by `start` if none runs).
    """
    env = os.environ if environ is None else environ
    systemd_store = bool(env.get("NOTIFY_SOCKET"))
    holder = None
    if systemd_store:
        fds = systemd.listen_fds()
    else:  # a holder a previous instance left
        holder = _attach(cfg, start=False)
        fds = holder.fds if holder is not None else {}
    group = fds.get(FDSTORE_GROUP)
    files = {k: v for k, v in fds.items() if k.startswith(FDSTORE_FILE_PREFIX)}
    if group is not None:
        os.set_blocking(group, False)
    return Startup(probe(cfg.cache_dir, group), group, files, holder, systemd_store)


def _attach(cfg: Config, *, start: bool) -> HolderClient | None:
    try:
        holder = attach(cfg.cache_dir, cfg.holder_grace, start=start)
    except OSError as exc:
        log.error("fd_holder_unavailable", error=str(exc),
                  consequence="a crash of this daemon lets readers of unfilled ranges "
                  "through: its successor detaches such mounts")
        return None
    if holder is not None:
        log.info("fd_holder_attached", holder_pid=holder.pid, fds=len(holder.fds))
    return holder


def start(cfg: Config, startup: Startup, store: LocalStore, fetcher: ChunkFetcher,
          executor: Executor) -> FanotifyFrontend:
    """The running front end (call on the loop; it starts reading at once).

    Off systemd, the fd holder is started here when none runs: only a daemon that got
    this far (device, store, control socket) has anything to hold.
    """
    if not startup.systemd_store and startup.holder is None:
        startup.holder = _attach(cfg, start=True)
    frontend = FanotifyFrontend(cfg.cache_dir, store, fetcher, executor,
                                readahead=cfg.readahead, group=startup.group,
                                inherited=startup.files, cache_max=cfg.cache_max,
                                nosuid=cfg.mount_nosuid,
                                keep_dirs=(cfg.store.absolute(),), fdstore=startup.holder)
    frontend.start()
    return frontend


class NoDevice:
    """The fscache front end's device when /dev/cachefiles is absent: never readable."""

    absent = True

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def read_message(self) -> bytes | None:
        return None

    def copen(self, msg_id: int, size_or_errno: int) -> None:
        raise OSError(22, f"no cachefiles device: cannot answer OPEN {msg_id} ({size_or_errno})")

    def command(self, text: bytes) -> None:
        msg = f"no cachefiles device: cannot send {text!r}"
        raise OSError(95, msg)

    def try_restore(self) -> bool:
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
