# SPDX-License-Identifier: Apache-2.0
"""HTTP over a root-only unix socket, for the daemon's views and actions.

Modules add their routes before the server starts::

    server = ControlServer(path)
    server.state["service"] = service            # what handlers need, by name
    server.add_route("GET", "/status", status_handler)
    await server.start()

or name route modules (each with ``add_routes(server)``) to import on demand::

    server = ControlServer(path, ["ondemand_d.control.status"])

`start` only binds the socket. The HTTP server (aiohttp) and the route modules are
imported when the first client connects, in a thread: a daemon nobody asks
never pays for them (about 0.2 s of start-up and 10 MB on the host, seconds
in the TCG guest), and READs go on while they load. The first client waits in
the socket's backlog meanwhile.

Handlers read `state(request)` (the same dict) and answer JSON through `json_ok`
or `json_error`; an exception escaping a handler becomes a 500 with its message (a
TypeError or ValueError, a value of the wrong kind in the request, a 400). What a
connection may cost and what a request may hold is guard.py's.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ondemand_d.control import guard
from ondemand_d.errors import OndemandError

if TYPE_CHECKING:
    from aiohttp import web

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger()


class ControlError(OndemandError):
    """The control socket cannot be served or reached; the message says what to do."""


@functools.cache
def _state_key() -> web.AppKey[dict[str, Any]]:
    from aiohttp import web  # noqa: PLC0415 - only once a client connected

    return web.AppKey("state", dict)


@functools.cache
def _limits_key() -> web.AppKey[tuple[float, int]]:
    from aiohttp import web  # noqa: PLC0415 - only once a client connected

    return web.AppKey("limits", tuple)


def json_ok(body: Any) -> web.Response:
    from aiohttp import web  # noqa: PLC0415

    return web.Response(text=json.dumps(body, default=str), content_type="application/json")


def json_error(status: int, message: str) -> web.Response:
    """An error answer: one sentence saying what is wrong and what to do."""
    from aiohttp import web  # noqa: PLC0415

    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json")


async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    from aiohttp import web  # noqa: PLC0415

    try:
        body = None
        if request.body_exists:
            # The whole body before the handler runs, within the idle deadline: a client
            # that stops mid-body would otherwise hold a handler (and its fd) forever.
            try:
                body = await asyncio.wait_for(request.read(), request.app[_limits_key()][0])
            except TimeoutError:
                late = json_error(408, "the request body did not arrive in time")
                late.force_close()  # after this answer: the rest of the body may still come
                return late
        problem = guard.bad_input(request, body)
        if problem is not None:
            return json_error(400, problem)
        return await handler(request)
    except web.HTTPException:
        raise
    except OndemandError as exc:
        return json_error(400, str(exc))
    except (TypeError, ValueError) as exc:
        # A value of the wrong type or form in the request (the body passed _bad_input, so
        # it is a JSON object), found by whatever used it: the client's mistake, not a 500.
        log.warning("control_request_refused", path=request.path, error=repr(exc))
        return json_error(400, f"{request.path}: a value in the request has the wrong type "
                          f"or form ({exc})")
    except Exception as exc:  # noqa: BLE001 - a broken view must not take the daemon down
        log.exception("control_request_failed", path=request.path, error=repr(exc))
        return json_error(500, f"{request.path} failed: {exc!r}")


def _import_all(modules: Sequence[str]) -> None:
    import aiohttp.web  # noqa: PLC0415, F401 - the bulk of the cost, off the loop

    for name in modules:
        importlib.import_module(name)


class ControlServer:
    """The daemon's control socket: mode 0600, owned by the daemon's user (root)."""

    def __init__(self, path: Path, route_modules: Sequence[str] = (), *,
                 idle_timeout: float = 30.0, max_connections: int = 32) -> None:
        self.path = path
        #: A connection that sends no whole request for this long is closed; a handler
        #: at work (a `trace` stream) is not idle.
        self.idle_timeout = idle_timeout
        #: Connections served at once; more are answered 503 and closed, so idle clients
        #: cannot use up the daemon's file descriptors (READs need them).
        self.max_connections = max_connections
        self.state: dict[str, Any] = {}
        self._modules = tuple(route_modules)
        self._routes: list[tuple[str, str, Handler]] = []
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loading: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._serving = False

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `method path` with `handler`; call before `start` (or from a route module)."""
        if self._serving:
            msg = f"route {method} {path} added after the control socket started"
            raise RuntimeError(msg)
        self._routes.append((method, path, handler))

    async def start(self) -> None:
        """Bind the socket (refusing to steal one a live daemon serves); serve on demand.

        Raises:
            ControlError: the path is in use by a running daemon or cannot be created.
        """
        self._sock = _bind_private(self.path)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._first_client)
        log.info("control_listening", socket=str(self.path))

    @property
    def loaded(self) -> bool:
        """Whether the HTTP server runs (a client connected since `start`)."""
        return self._serving

    def _first_client(self) -> None:
        assert self._loop is not None and self._sock is not None  # noqa: S101 - started
        self._loop.remove_reader(self._sock.fileno())
        self._loading = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._sock is not None  # noqa: S101 - started
        try:
            await asyncio.to_thread(_import_all, self._modules)
            from aiohttp import web  # noqa: PLC0415 - imported just now, in the thread

            for name in self._modules:
                importlib.import_module(name).add_routes(self)
            app = web.Application(middlewares=[web.middleware(_errors)])
            app[_state_key()] = self.state
            app[_limits_key()] = (self.idle_timeout, self.max_connections)
            for method, path, handler in self._routes:
                app.router.add_route(method, path, handler)
            app.router.add_get("/", self._index)
            self._serving = True
            # A stopping daemon waits this long for open views (a `trace` ends at once).
            # keepalive_timeout: aiohttp closes a connection whose next request has not
            # arrived whole this long after it opened or after the previous answer.
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   shutdown_timeout=2.0, keepalive_timeout=self.idle_timeout,
                                   logger=guard.HttpLog("ondemand_d.control.http"))
            await runner.setup()
            self._runner = runner
            await guard.capped_site(runner, self._sock, self.max_connections).start()
        except Exception as exc:  # noqa: BLE001 - the daemon serves on without its socket
            log.error("control_unavailable", socket=str(self.path), error=repr(exc))
            self._sock.close()
            return
        log.info("control_serving", socket=str(self.path), routes=len(self._routes))

    async def _index(self, _request: web.Request) -> web.Response:
        return json_ok({"routes": sorted(f"{m} {p}" for m, p, _ in self._routes)})

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            if self._loading is None and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())  # nobody connected
            self._sock.close()  # idempotent; the runner may have closed it already
            self._sock = None
            with contextlib.suppress(ControlError):
                _unlink_stale_socket(self.path)  # ours, unless something replaced it


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
    _unlink_stale_socket(path)
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


def _unlink_stale_socket(path: Path) -> None:
    """Remove the socket a dead daemon left at `path`; anything else there is not ours."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        msg = (f"the control socket path {path} is taken by something that is not a socket: "
               "move it away, or point control_socket elsewhere")
        raise ControlError(msg)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


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
    return request.app[_state_key()]
