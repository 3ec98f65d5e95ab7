# SPDX-License-Identifier: Apache-2.0
"""HTTP over a root-only unix socket, for the daemon's views and actions.

Modules add their routes before the server starts::

    server = ControlServer(path)
    server.state["service"] = service            # what handlers need, by name
    server.add_route("GET", "/status", status_handler)
    await server.start()

Handlers read `request.app[STATE]` (the same dict) and answer JSON through `json_ok`
or `json_error`; an exception escaping a handler becomes a 500 with its message.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from ondemand_d.errors import OndemandError

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)


class ControlError(OndemandError):
    """The control socket cannot be served or reached; the message says what to do."""


def json_ok(body: Any) -> web.Response:
    return web.Response(text=json.dumps(body, default=str), content_type="application/json")


def json_error(status: int, message: str) -> web.Response:
    """An error answer: one sentence saying what is wrong and what to do."""
    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except OndemandError as exc:
        return json_error(400, str(exc))
    except Exception as exc:  # noqa: BLE001 - a broken view must not take the daemon down
        log.exception("control_request_failed", path=request.path, error=repr(exc))
        return json_error(500, f"{request.path} failed: {exc!r}")


class ControlServer:
    """The daemon's control socket: mode 0600, owned by the daemon's user (root)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict[str, Any] = {}
        self._routes: list[tuple[str, str, Handler]] = []
        self._runner: web.AppRunner | None = None

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `method path` with `handler`; call before `start`."""
        if self._runner is not None:
            msg = f"route {method} {path} added after the control socket started"
            raise RuntimeError(msg)
        self._routes.append((method, path, handler))

    async def start(self) -> None:
        """Bind the socket (refusing to steal one a live daemon serves) and serve.

        Raises:
            ControlError: the path is in use by a running daemon or cannot be created.
        """
        app = web.Application(middlewares=[_errors])
        app[STATE] = self.state
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        app.router.add_get("/", self._index)
        sock = _bind_private(self.path)
        # A stopping daemon waits this long for open views (a `trace` ends at once).
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        log.info("control_listening", socket=str(self.path))

    async def _index(self, _request: web.Request) -> web.Response:
        return json_ok({"routes": sorted(f"{m} {p}" for m, p, _ in self._routes)})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _bind_private(path: Path) -> socket.socket:
    """A listening unix socket at `path` that only its owner can connect to."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create {path.parent} for the control socket: {exc.strerror}"
        raise ControlError(msg) from exc
    if _someone_listens(path):
        msg = (f"another ondemand-d serves the control socket {path}: stop it, or give this "
               "one its own control_socket")
        raise ControlError(msg)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a daemon that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # no window in which the socket is open to others
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        msg = f"cannot bind the control socket {path}: {exc.strerror}"
        raise ControlError(msg) from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _someone_listens(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        return True  # e.g. EACCES: someone else's socket; never unlink it
    finally:
        probe.close()
    return True


def state(request: web.Request) -> dict[str, Any]:
    """The server's shared state dict, from inside a handler."""
    return request.app[STATE]
