# SPDX-License-Identifier: Apache-2.0
"""Small HTTP helpers for the registry client: status checks, bounded bodies, headers, errors."""

from __future__ import annotations

import errno
import io
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar

import aiohttp
from yarl import URL

from ondemand_d.errors import FetchError

T = TypeVar("T")
#: A Retry-After longer than this is capped: a READ is waiting.
RETRY_AFTER_CAP = 30.0
Body = Callable[[], bytes] | None
Handler = Callable[[aiohttp.ClientResponse], Awaitable[T]]
#: Bodies above this are handed to aiohttp as a file object.
INLINE_BODY = 1 << 20


class RetryableError(Exception):
    """Internal: this attempt failed in a way worth another try."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def api(repository: str) -> URL:
    """The relative URL ``/v2/<repository>``; the client puts the scheme and host in front."""
    return URL.build(path=f"/v2/{repository}")


def scope(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"


def location(status: int) -> Handler[URL]:
    async def handle(resp: aiohttp.ClientResponse) -> URL:
        expect(resp, (status,), "upload")
        await resp.read()
        loc = resp.headers.get("Location")
        return joined(resp.url, loc, f"{resp.url.host}: upload Location") if loc else resp.url

    return handle


def checked_url(text: str, what: str, base: URL | None = None) -> URL:
    """`text` as an absolute http(s) URL with a plausible host (relative to `base` if given).

    A registry's Location header and a token realm are untrusted: yarl raises ValueError on
    some (an unclosed IPv6 bracket, a port over 65535), accepts spaces in others.

    Raises:
        FetchError: not retryable; says which header was malformed.
    """
    try:
        url = URL(text, encoded=True) if base is not None else URL(text)
        if base is not None:
            url = base.join(url)
        host, _port = url.host, url.port  # the port is parsed (and may fail) only here
    except (ValueError, TypeError):
        host = None
    if (host is None or url.scheme not in ("http", "https") or not host
            or any(c.isspace() or not c.isprintable() for c in host)):
        msg = f"{what} is not a usable http(s) URL: the registry sent a malformed header"
        raise FetchError(msg, retryable=False)
    return url


def joined(base: URL, location: str, what: str) -> URL:
    """A Location header resolved against the URL that sent it (see `checked_url`)."""
    return checked_url(location, what, base)


def expect(resp: aiohttp.ClientResponse, ok: tuple[int, ...], what: str) -> None:
    if resp.status in ok:
        return
    if resp.status == 404:  # noqa: PLR2004
        msg = f"{what}: not found in the registry (HTTP 404)"
        raise FetchError(msg, retryable=False)
    msg = f"{what}: unexpected HTTP {resp.status} from {resp.url.host}{resp.url.path}"
    raise FetchError(
        msg,
        retryable=False,
    )


async def iter_body(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for piece in resp.content.iter_chunked(1 << 16):
        yield piece


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """Read a body of at most `limit` bytes; more is a protocol error, not a memory bomb."""
    if resp.content_length is not None and resp.content_length <= limit:
        # Announced and acceptable: one read, one join. A short body raises
        # ClientPayloadError (retried); a longer one is cut by the parser.
        return await resp.read()
    out = bytearray()
    async for piece in iter_body(resp):
        out += piece
        if len(out) > limit:
            msg = f"{what}: response is larger than {limit} bytes"
            raise FetchError(msg, retryable=False)
    return bytes(out)


def content_range_start(value: str) -> int | None:
    # "bytes 100-199/1000"
    try:
        unit, _, spec = value.partition(" ")
        return int(spec.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def describe(exc: BaseException) -> str:
    """A short reason without URLs or headers (aiohttp's str() can carry both)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated or malformed body"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, OSError) and exc.errno:
        return f"connection error ({errno.errorcode.get(exc.errno, exc.errno)})"
    return type(exc).__name__


def unreachable(err: OSError) -> bool:
    """Refused, unroutable or unresolvable: says nothing about TLS."""
    if isinstance(err, ConnectionRefusedError | socket.gaierror):
        return True
    return err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT)


def payload(body: Body) -> bytes | io.BytesIO | None:
    """Large bodies go as a file object, which aiohttp sends in pieces (sized, not chunked)."""
    if body is None:
        return None
    data = body()
    return io.BytesIO(data) if len(data) > INLINE_BODY else data
