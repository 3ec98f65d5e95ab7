# SPDX-License-Identifier: Apache-2.0
"""The CLI's side of the control socket: HTTP/1.1 over AF_UNIX with the standard library.

No aiohttp here: `ondemand-d status` should answer in the time Python takes to start.
"""
from __future__ import annotations

import errno
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ondemand_d.errors import OndemandError


class ControlUnavailable(OndemandError):
    """No daemon answers on the control socket, or it refused the request."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError as exc:
            sock.close()
            raise ControlUnavailable(_unreachable(self._path, exc)) from exc
        self.sock = sock


def _unreachable(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return (f"no ondemand-d is serving the control socket {path}: start `ondemand-d serve`, "
                "or point --socket (or control_socket) at the one it uses")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"the control socket {path} is root-only: run this command as root"
    return f"cannot reach the control socket {path}: {exc.strerror}"


class ControlClient:
    """Requests to a running daemon's control socket."""

    def __init__(self, path: Path, timeout: float | None = 30) -> None:
        self.path = path
        self.timeout = timeout

    def _request(self, method: str, url: str, body: Any = None, *,
                 stream: bool = False) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.path, self.timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            conn.close()
            msg = f"the daemon on {self.path} did not answer {method} {url}: {exc!r}"
            raise ControlUnavailable(msg) from exc
        if resp.status >= 400:  # noqa: PLR2004
            text = resp.read().decode(errors="replace")
            conn.close()
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = f"{method} {url}: HTTP {resp.status} {text[:200]}"
            raise ControlUnavailable(message)
        if stream and conn.sock is not None:
            # A stream may stay quiet for as long as nothing happens: only the answer is timed.
            conn.sock.settimeout(None)
        return resp

    def get(self, url: str) -> Any:
        """GET a JSON view."""
        return json.loads(self._request("GET", url).read())

    def post(self, url: str, body: Any = None) -> Any:
        """POST an action; return its JSON answer."""
        return json.loads(self._request("POST", url, body if body is not None else {}).read())

    def text(self, url: str) -> str:
        """GET a text view (e.g. /metrics)."""
        return self._request("GET", url).read().decode()

    def lines(self, url: str) -> Iterator[dict[str, Any]]:
        """GET a stream of JSON lines; ends when the daemon ends it (never times out)."""
        resp = self._request("GET", url, stream=True)
        while True:
            line = resp.readline()
            if not line:
                return
            if line.strip():
                yield json.loads(line)
