# SPDX-License-Identifier: Apache-2.0
"""What one control connection may cost the daemon, and what its request may hold.

The control socket is root-only, yet every connection is an fd of the daemon's, which
READs need too: connections beyond `control_max_connections` get a 503 sentence and are
closed at once (counted here, before aiohttp sees them), and aiohttp's keepalive timeout
closes one that sends no whole request within `control_idle_timeout` (server.py passes it
and reads bodies within the same deadline). A request's URL and JSON body are checked
before any handler sees them (`bad_input`): handlers pass names and paths on to os and the
store, where a NUL byte or a lone surrogate is a ValueError, and json.loads recurses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger()


def _refusal(message: str) -> bytes:
    """A whole HTTP answer for a connection refused before aiohttp sees it."""
    body = json.dumps({"error": message}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: one answer saying so, then closed."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)  # noqa: S101 - a stream socket
        transport.write(self._answer)
        transport.close()


class HttpLog(logging.Logger):
    """aiohttp's own messages (a malformed request) as one log line, without a traceback."""

    def _log(self, level: int, msg: object, args: Any, exc_info: Any = None,
             *_rest: Any, **_kw: Any) -> None:
        text = str(msg) % args if args else str(msg)
        error = exc_info if isinstance(exc_info, BaseException) else None
        # A client's malformed request is no error of the daemon's: warning at most.
        log.log(min(level, logging.WARNING), "control_http_error", message=text,
                error=None if error is None else str(error))


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted in `live` until it is lost."""

    def __init__(self, inner: asyncio.Protocol, live: set[_Counted]) -> None:
        self._inner = inner
        self._live = live
        live.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._inner.connection_lost(exc)


def bad_input(request: web.Request, body: bytes | None) -> str | None:
    """What is wrong with a request's URL or JSON body, or None.

    Handlers get names and paths from here; a NUL byte or a lone surrogate in one ends in a
    ValueError deep inside os or the store, and json.loads recurses on nesting.
    """
    if "\x00" in request.path or any("\x00" in k + v for k, v in request.query.items()):
        return "the URL holds a NUL byte: names and paths never do"
    if not body:
        return None
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return "the body is not UTF-8: send a JSON object"
    except ValueError:
        return "the body is not JSON: send a JSON object"
    except RecursionError:
        return "the body nests too deeply: send a flat JSON object"
    if not isinstance(document, dict):
        return "the body must be a JSON object"
    pending: list[Any] = [document]
    while pending:  # no recursion: the depth is what json.loads allowed
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a string in the body holds a NUL byte: names and paths never do"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string in the body holds a lone surrogate: send UTF-8 text"
    return None


def capped_site(runner: web.AppRunner, sock: socket.socket,
                 cap: int) -> web.SockSite:
    """aiohttp's SockSite on `sock`, serving at most `cap` connections at once."""
    from aiohttp import web  # noqa: PLC0415 - only once a client connected

    class CappedSite(web.SockSite):
        async def start(self) -> None:
            await web.BaseSite.start(self)  # SockSite.start without its create_server
            server = runner.server
            assert server is not None  # noqa: S101 - set up
            refusal = _refusal(f"the control socket serves {cap} connections at once and all "
                               "are taken: try again shortly")
            live: set[_Counted] = set()

            def accept() -> asyncio.BaseProtocol:
                # Counted here, not by aiohttp: a burst of accepts creates every protocol
                # before the first connection_made.
                if len(live) >= cap:
                    log.warning("control_connection_refused", connections=cap)
                    return _Refused(refusal)
                return _Counted(server(), live)

            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(accept, sock=sock)

    return CappedSite(runner, sock)
