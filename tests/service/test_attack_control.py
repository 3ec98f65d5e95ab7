# SPDX-License-Identifier: Apache-2.0
"""Attacks on the control socket of a running daemon (daemon.serve on the fake kernel)."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import stat

import pytest

from ondemand_d import log

from .test_control import Running


@pytest.fixture(autouse=True)
def _observed_logs():
    """Logging as `serve` configures it, so the control socket's counters see the lines."""
    log.configure("json", "warning", cache=False, observe=True)


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink", "fifo"])
async def test_control_socket_path_that_is_not_a_socket_is_left_alone(tmp_path, kind):
    """`--control-socket` naming a file (or anything but a socket) refuses it and keeps it:
    it was deleted and replaced by the socket before."""
    path = tmp_path / "ctl.sock"
    if kind == "regular file":
        path.write_bytes(b"precious\n")
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"precious\n")
    elif kind == "symlink":
        (tmp_path / "target").write_bytes(b"precious\n")
        path.symlink_to(tmp_path / "target")
    else:
        os.mkfifo(path)
    before = path.lstat()
    events: list[dict] = []
    log.observe(lambda _m, e: events.append(dict(e)))
    async with Running(tmp_path) as d:
        assert d.socket == path
        d.add_image("img", os.urandom(8192))
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        assert await d.kernel.read(obj, 0, 4096)  # the daemon serves on
    after = path.lstat()
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino,
                                                           stat.S_IFMT(before.st_mode))
    if kind in ("regular file", "symlink"):
        assert path.read_bytes() == b"precious\n"
    refused = [e for e in events if e["event"] == "control_unavailable"]
    assert refused and "not a socket" in refused[0]["error"]


def _connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)  # a hang guard only: each wait below ends on an event
    sock.connect(str(path))
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


async def test_connections_beyond_the_cap_are_refused_and_idle_ones_closed(tmp_path):
    """cap+3 clients that never send: the 3 beyond the cap get a 503 sentence at once,
    READs go on, the idle ones are closed after the idle timeout and `status` answers again.
    Before, every connection stayed open for good: enough of them used up the daemon's fds."""
    cap = 4
    async with Running(tmp_path, control_max_connections=cap, control_idle_timeout=1.5) as d:
        d.add_image("img", os.urandom(8192))
        # All connect before the first is accepted (the first loads the server): one burst.
        streams = [await asyncio.open_unix_connection(d.socket) for _ in range(cap + 3)]
        answers = await asyncio.gather(*(reader.read() for reader, _ in streams))
        for _, writer in streams:
            writer.close()
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        assert await d.kernel.read(obj, 0, 4096)
        assert (await d.get("/status"))["pid"] == os.getpid()
    refused = [a for a in answers if a]
    assert len(refused) == 3
    for answer in refused:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert "connections at once" in json.loads(body)["error"]
    assert answers[:cap] == [b""] * cap  # the idle ones: closed without a word


async def test_stalled_requests_are_closed_but_a_trace_stream_is_not(tmp_path):
    """A request whose headers or body stop coming is closed after the idle timeout (a body
    with a 408); a `trace` stream opened before stays open through it and shows the next
    request. Before, both stalled connections stayed open for good."""
    async with Running(tmp_path, control_idle_timeout=0.5) as d:
        d.add_image("img", os.urandom(8192))
        lines = d.client.lines("/trace")
        assert (await asyncio.to_thread(next, lines))["event"] == "_subscribed"
        headers = _connect(d.socket)
        headers.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        body = _connect(d.socket)
        body.sendall(b"POST /cull HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        assert await asyncio.to_thread(_until_closed, headers) == b""
        answer = await asyncio.to_thread(_until_closed, body)
        await d.kernel.open(b"img-data", b"erofs,dom")
        line = await asyncio.to_thread(next, lines)
    assert answer.startswith(b"HTTP/1.1 408")
    assert "did not arrive in time" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert (line["op"], line["key"]) == ("OPEN", "img-data")


BAD_REQUESTS = {
    "deep JSON": ("POST", "/cull", b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    "JSON list": ("POST", "/cull", b'["unused"]', "must be a JSON object"),
    "NUL in a name": ("POST", "/cull", b'{"image": "img\\u0000x"}', "NUL byte"),
    "lone surrogate": ("POST", "/cull", b'{"image": "\\ud800"}', "lone surrogate"),
    "not UTF-8": ("POST", "/cull", b'{"image": "\xff\xfe"}', "not UTF-8"),
    "not JSON": ("POST", "/cull", b'{"image": ', "not JSON"),
    "NUL in a query": ("GET", "/trace?image=img%00x", None, "NUL byte"),
    "a number for a name": ("POST", "/cull", b'{"image": 5}', "wrong type"),
    "a list for a name": ("POST", "/cull", b'{"image": ["img"]}', "wrong type"),
    "an infinite number for a name": ("POST", "/cull", b'{"image": 1e999}', "wrong type"),
    "NUL in a mount path": ("POST", "/fanotify/mount",
                            b'{"image": "img", "mountpoint": "/mnt/\\u0000"}', "NUL byte"),
}


async def test_bad_requests_get_one_error_and_the_connection_goes_on(tmp_path, capfd):
    """Each bad request gets a 400 with one sentence (not a 500 or a traceback), on one
    keep-alive connection that then still answers `status`; a request line over aiohttp's
    limit gets its 400 too, and the daemon still serves READs."""
    async with Running(tmp_path) as d:
        d.add_image("img", os.urandom(8192))

        def ask_all() -> list[tuple[int, str]]:
            conn = _UnixHTTP(d.socket)
            out = []
            for method, url, body, _ in BAD_REQUESTS.values():
                conn.request(method, url, body=body,
                             headers={"Content-Type": "application/json"} if body else {})
                resp = conn.getresponse()
                out.append((resp.status, json.loads(resp.read())["error"]))
            conn.request("GET", "/status")
            resp = conn.getresponse()
            out.append((resp.status, json.loads(resp.read())["pid"]))
            conn.close()
            return out

        answers = await asyncio.to_thread(ask_all)
        huge = _connect(d.socket)
        huge.sendall(b"GET /status?x=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        too_long = await asyncio.to_thread(_until_closed, huge)
        obj = await d.kernel.open(b"img-data", b"erofs,dom")
        assert await d.kernel.read(obj, 0, 4096)
    for (status, error), (name, (*_, expected)) in zip(answers, BAD_REQUESTS.items(),
                                                         strict=False):
        assert (status, expected in error) == (400, True), (name, status, error)
    assert answers[-1] == (200, os.getpid())
    assert too_long.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert '"event": "control_http_error"' in out  # aiohttp's complaint, as one line


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = _connect(self._path)
