# SPDX-License-Identifier: Apache-2.0
"""A fault-injecting HTTP/1.1 proxy in front of the test registry (127.0.0.1 only).

It parses requests itself and writes responses byte by byte, so it can do what
a well-behaved server library will not: stall, reset, send fewer body bytes
than Content-Length promised, flip bytes, ignore Range, redirect to "blob
storage" (the same proxy under the name localhost). It counts the blob body
bytes it sends, which is how tests see how much a lazy fetch really pulled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

import aiohttp

MAX_REQUESTS_PER_CONNECTION = 1000


@dataclass
class Fault:
    """Applied to the next `times` requests whose path contains `match`.

    kind: "delay" (sleep `seconds` before answering), "stall" (send headers and
    half the body, then sleep `seconds`), "status" (answer `status`, with
    Retry-After `retry_after` and `headers` if set), "reset" (TCP RST, no answer), "truncate"
    (half the promised body, then close), "corrupt" (flip one body byte),
    "ignore_range" (forward without Range: the whole blob comes back with 200),
    "redirect" (307 to the same path on localhost, as blob storage would),
    "widen" (forward a Range widened to 64 KiB alignment and 4 KiB more, as some CDNs do).
    """

    kind: str
    times: int = 1
    match: str = "/blobs/sha256:"
    method: str = "GET"
    seconds: float = 0.0
    status: int = 503
    retry_after: str | None = None
    headers: str = ""  # raw header lines ("Name: value\r\n") a "status" answer also carries


@dataclass
class Seen:
    method: str
    host: str
    path: str
    authorization: bool
    range: str | None


@dataclass
class FaultProxy:
    upstream: str  # "127.0.0.1:PORT"
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    blob_bytes: int = 0
    inflight: int = 0  # requests being answered now
    max_inflight: int = 0
    storage_authorization: str | None = None  # what a signed storage URL would carry
    port: int = 0
    _server: asyncio.Server | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._session is not None:
            await self._session.close()

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def _take(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.match in path:
                fault.times -= 1
                return fault
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                if not await self._one(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        first = await reader.readexactly(1)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._answer(first, reader, writer)
        finally:
            self.inflight -= 1

    async def _answer(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if first == b"\x16":  # a TLS ClientHello (the client's https probe): not spoken here
            return False
        head = first + await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        host = headers.get("host", "")
        self.seen.append(
            Seen(method, host, target, "authorization" in headers, headers.get("range"))
        )
        # Requests to "storage" (the localhost name) are served straight.
        fault = None if host.startswith("localhost") else self._take(method, target)
        kind = fault.kind if fault else ""
        if kind == "delay":
            await asyncio.sleep(fault.seconds)  # type: ignore[union-attr]
        if kind == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if kind == "status":
            assert fault is not None
            extra = f"Retry-After: {fault.retry_after}\r\n" if fault.retry_after else ""
            extra += fault.headers
            writer.write(
                f"HTTP/1.1 {fault.status} Fault\r\n{extra}Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()
            return True
        if kind == "redirect":
            location = f"http://localhost:{self.port}{target}"
            status_line = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
            writer.write(f"{status_line}Content-Length: 0\r\n\r\n".encode())
            await writer.drain()
            return True
        forward = {
            k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")
        }
        forward["host"] = self.host
        if host.startswith("localhost") and self.storage_authorization:
            forward["authorization"] = self.storage_authorization
        if kind == "ignore_range":
            forward.pop("range", None)
        if kind == "widen" and "range" in forward:
            lo, hi = (int(x) for x in forward["range"].removeprefix("bytes=").split("-"))
            forward["range"] = f"bytes={lo - lo % 65536}-{hi + 4096}"
        assert self._session is not None
        async with self._session.request(
            method,
            f"http://{self.upstream}{target}",
            headers=forward,
            data=body or None,
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            status, reason = resp.status, resp.reason or "OK"
            out_headers = [
                (k, v)
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            ]
        if kind == "corrupt" and payload:
            payload = payload[:-1] + bytes([payload[-1] ^ 0x01])
        text = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in out_headers)
        length = len(payload) if method != "HEAD" else int(resp.headers.get("content-length", "0"))
        writer.write(f"{text}Content-Length: {length}\r\n\r\n".encode())
        if method == "HEAD":
            await writer.drain()
            return True
        if "/blobs/" in target and method == "GET":
            self.blob_bytes += (
                len(payload) if kind not in ("truncate", "stall") else len(payload) // 2
            )
        if kind in ("truncate", "stall"):
            writer.write(payload[: len(payload) // 2])
            await writer.drain()
            if kind == "stall":
                await asyncio.sleep(fault.seconds)  # type: ignore[union-attr]
            return False
        writer.write(payload)
        await writer.drain()
        return True
