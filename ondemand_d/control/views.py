# SPDX-License-Identifier: Apache-2.0
"""The daemon's control socket: which views it serves, and starting it.

A module that serves routes has `add_routes(server)`; list it in `ROUTE_MODULES`
(or call `server.add_route` before `server.start()`). The route modules and aiohttp
are imported when the first client connects (server.py), none at start-up. Handlers
find the running daemon in `state(request)["runtime"]` (a `status.Runtime`); a front
end keeps its own objects in `Runtime.frontends`.
"""
from __future__ import annotations

from typing import Any

from ondemand_d import log
from ondemand_d.config import Config
from ondemand_d.control.observe import Observer
from ondemand_d.control.server import ControlServer
from ondemand_d.control.status import Runtime
from ondemand_d.device import KernelFeatures

ROUTE_MODULES = [
    "ondemand_d.control.status",
    "ondemand_d.control.inflight",
    "ondemand_d.control.metrics",
    "ondemand_d.control.trace",
    "ondemand_d.control.cull",
    "ondemand_d.fanotify.control",
]


class DaemonControl(ControlServer):
    """The control server of one daemon; stopping it also stops counting."""

    observer: Observer

    async def stop(self) -> None:
        log.unobserve(self.observer)
        self.observer.close()
        await super().stop()


async def start(  # noqa: PLR0913 - what the views show
    cfg: Config, service: Any, device: Any, features: KernelFeatures, *, restored: bool,
    backend: str,
) -> DaemonControl:
    """Serve the control socket at `cfg.control_socket`; return the running server."""
    assert cfg.control_socket is not None  # noqa: S101 - checked by the caller
    observer = Observer()
    server = DaemonControl(cfg.control_socket, ROUTE_MODULES,
                           idle_timeout=cfg.control_idle_timeout,
                           max_connections=cfg.control_max_connections)
    server.observer = observer
    server.state["runtime"] = Runtime(cfg, service, device, features, observer,
                                      restored=restored, backend=backend)
    await server.start()
    log.observe(observer)
    return server
