# SPDX-License-Identifier: Apache-2.0
"""An OCI distribution client over aiohttp: range GETs, retries, redirects, auth.

One `RegistryClient` keeps one connection pool for all registries and a
`PriorityLimiter` per registry host. Every request goes through `request`,
which owns the policy: authorization (answering 401 once per attempt),
redirects (followed by hand so Authorization never leaves the registry host),
retries with exponential backoff and jitter on connection errors, timeouts,
5xx, 408 and 429 (Retry-After honoured, capped). Logs and exceptions carry the
method, registry, path and status; never headers, never query strings (signed
storage URLs put secrets there).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import time
from typing import BinaryIO, Self, TypeVar

import aiohttp
import structlog
from yarl import URL

from ondemand_d.errors import DigestMismatch, FetchError
from ondemand_d.registry._http import (
    Body,
    Handler,
    RetryableError,
    api,
    content_range_start,
    describe,
    expect,
    iter_body,
    joined,
    payload,
    read_bounded,
    retry_after,
    scope,
    unreachable,
)
from ondemand_d.registry._limiter import Priority, PriorityLimiter
from ondemand_d.registry.auth import Authenticator, load_docker_config
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.reference import Reference, is_loopback

log = structlog.get_logger()
T = TypeVar("T")
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_REDIRECTS = 5
_RETRY_STATUSES = {408, 429}  # request timeout, too many requests; and every 5xx
_SERVER_ERROR = 500
#: Seconds the https probe of an http-allowed registry may take.
_PROBE_TIMEOUT = 3.0


class RegistryClient:
    """Talks the distribution API to any number of registries."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self._auth = Authenticator(load_docker_config(config.docker_config))
        self._session: aiohttp.ClientSession | None = None
        self._limiters: dict[str, PriorityLimiter] = {}
        self._range_ignored: set[str] = set()
        self._schemes: dict[str, URL] = {}
        self.bytes_received = 0  # body bytes of blob GETs, for counters and benches
        self.requests = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; the client may not be used afterwards."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session belongs to the loop it was made on.
        if self._session is None:
            # True: aiohttp's verifying default context, built when aiohttp was
            # imported. A context of our own loads the CA store again (1 s in the
            # TCG guest, bench/bench_client_setup.py), so only for an extra CA.
            ctx: ssl.SSLContext | bool = True
            if self.config.ca_file is not None:
                ctx = ssl.create_default_context()
                ctx.load_verify_locations(cafile=str(self.config.ca_file))
            connector = aiohttp.TCPConnector(
                ssl=ctx,
                limit=0,
                limit_per_host=self.config.concurrency + 2,
                enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, headers={"User-Agent": "ondemand-d"}
            )
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        c = self.config
        return aiohttp.ClientTimeout(
            total=c.request_timeout, sock_connect=c.connect_timeout, sock_read=c.read_timeout
        )

    def may_use_http(self, registry: str) -> bool:
        """Plain HTTP is allowed only for loopback and hosts listed as insecure."""
        host = Reference(registry, "x").host
        insecure = self.config.insecure
        return is_loopback(host) or registry in insecure or host in insecure

    async def base(self, registry: str) -> URL:
        """The registry's root URL: https, or http where allowed and TLS is not spoken.

        Where plain HTTP is allowed, one probe of ``https://registry/v2/`` decides
        (as docker does for insecure registries): a server that answers the TLS
        handshake is used over TLS, with its certificate checked like any other;
        only a handshake that fails as not-TLS falls back to http. The answer is
        remembered for the life of the client.
        """
        known = self._schemes.get(registry)
        if known is not None:
            return known
        secure = URL(f"https://{registry}")
        if not self.may_use_http(registry):
            self._schemes[registry] = secure
            return secure
        timeout = aiohttp.ClientTimeout(total=min(self.config.connect_timeout, _PROBE_TIMEOUT))
        plain = URL(f"http://{registry}")
        try:
            async with self._get_session().get(secure / "v2" / "", timeout=timeout) as resp:
                await resp.read()
            chosen = secure
        except aiohttp.ClientConnectorCertificateError:
            chosen = secure  # TLS it is; the request itself reports the untrusted certificate
        except aiohttp.ClientConnectorError as exc:
            if not isinstance(exc, aiohttp.ClientSSLError) and unreachable(exc.os_error):
                raise  # nobody there: decide next time, do not guess now
            chosen = plain  # the handshake failed or was cut: not a TLS server
        except (aiohttp.ClientError, TimeoutError):
            chosen = plain  # no TLS handshake came back: a plain HTTP server
        self._schemes[registry] = chosen
        log.debug("registry_scheme", registry=registry, scheme=chosen.scheme)
        return chosen

    def limiter(self, registry: str) -> PriorityLimiter:
        lim = self._limiters.get(registry)
        if lim is None:
            lim = PriorityLimiter(self.config.concurrency, self.config.prefetch_concurrency)
            self._limiters[registry] = lim
        return lim

    # -- the one request loop -----------------------------------------------------

    async def request(  # noqa: PLR0913 - one loop, many knobs
        self,
        method: str,
        registry: str,
        url: URL,
        handle: Handler[T],
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: Body = None,
        priority: Priority = "demand",
        retries: int | None = None,
    ) -> T:
        """Send until `handle` returns, a non-retryable error, or retries run out.

        `handle` sees every response that is not a redirect, a 401 we could answer,
        or a retryable status; it reads the body while the slot is held.
        """
        attempts = 1 + (self.config.retries if retries is None else retries)
        last = "no attempt"
        for attempt in range(attempts):
            start = time.monotonic()
            try:
                async with self.limiter(registry).slot(priority):
                    async with asyncio.timeout(self.config.request_timeout):
                        base = await self.base(registry)
                        target = url if url.is_absolute() else base.join(url)
                        return await self._attempt(
                            method, registry, base, target, handle, scope, headers or {}, body
                        )
            except aiohttp.ClientConnectorCertificateError:
                msg = (
                    f"{registry}: TLS certificate not trusted (give its CA with ca_file/--ca-file)"
                )
                raise FetchError(msg, retryable=False) from None
            except RetryableError as exc:
                last, delay = exc.reason, exc.delay
            except FetchError as exc:
                if not exc.retryable:
                    raise
                last, delay = str(exc), None
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                last, delay = describe(exc), None
            if attempt + 1 == attempts:
                break
            if delay is None:
                delay = min(self.config.backoff_max, self.config.backoff_base * 2**attempt)
                delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
            log.info(
                "registry_retry",
                method=method,
                registry=registry,
                path=url.path,
                reason=last,
                attempt=attempt + 1,
                delay_s=round(delay, 3),
                duration_ms=round((time.monotonic() - start) * 1000),
            )
            await asyncio.sleep(delay)
        msg = f"{method} {registry}{url.path}: {last} (after {attempts} attempts)"
        raise FetchError(msg, retryable=True)

    async def _attempt(  # noqa: PLR0913
        self,
        method: str,
        registry: str,
        base: URL,
        url: URL,
        handle: Handler[T],
        scope: str,
        headers: dict[str, str],
        body: Body,
    ) -> T:
        session = self._get_session()
        authorization = self._auth.header(registry, scope)
        answered = False
        hops = 0
        while True:
            send = dict(headers)
            # Credentials go to the registry's own origin only: never to blob
            # storage on another host, never over a scheme it was not reached by.
            same_host = (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
            if authorization and same_host:
                send["Authorization"] = authorization
            self.requests += 1
            async with session.request(
                method,
                url,
                headers=send,
                data=payload(body),
                allow_redirects=False,
                timeout=self._timeout(),
            ) as resp:
                status = resp.status
                log.debug(
                    "registry_request",
                    method=method,
                    registry=registry,
                    path=url.path,
                    status=status,
                )
                if status in _REDIRECTS and "Location" in resp.headers and hops < _MAX_REDIRECTS:
                    hops += 1
                    url = joined(url, resp.headers["Location"], f"{registry}: redirect Location")
                    if url.scheme == "http" and not self.may_use_http(url.raw_authority):
                        msg = f"{registry}: refusing a redirect to plain http://{url.host}"
                        raise FetchError(msg, retryable=False)
                    if status == 303:  # noqa: PLR2004
                        method, body = "GET", None
                    continue
                if status == 401 and same_host and not answered:  # noqa: PLR2004
                    challenge = resp.headers.get("WWW-Authenticate")
                    if not challenge:
                        msg = f"{registry}: 401 without a challenge"
                        raise FetchError(msg, retryable=False)
                    self._auth.forget(registry, scope)
                    authorization = await self._auth.answer(
                        session, registry, scope, challenge, self._timeout(), self.may_use_http
                    )
                    answered = True
                    continue
                if status in _RETRY_STATUSES or status >= _SERVER_ERROR:
                    msg = f"HTTP {status}"
                    raise RetryableError(msg, retry_after(resp.headers.get("Retry-After")))
                if status in (401, 403):
                    msg = f"{method} {registry}{url.path}: access denied (HTTP {status})"
                    raise FetchError(msg, retryable=False)
                return await handle(resp)

    # -- reads ------------------------------------------------------------------

    async def get_manifest(self, ref: Reference, accept: str) -> tuple[bytes, str]:
        """The manifest bytes and their digest; a digest reference is checked."""
        url = api(ref.repository) / "manifests" / ref.ref

        async def handle(resp: aiohttp.ClientResponse) -> bytes:
            expect(resp, (200,), f"manifest {ref}")
            return await read_bounded(resp, 4 << 20, f"manifest {ref}")

        data = await self.request(
            "GET",
            ref.registry,
            url,
            handle,
            scope=scope(ref.repository),
            headers={"Accept": accept},
        )
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.digest and ref.digest != digest:
            msg = f"manifest {ref}: content hashes to {digest}"
            raise DigestMismatch(msg)
        return data, digest

    async def get_blob(self, registry: str, repository: str, digest: str, max_size: int) -> bytes:
        """A whole blob, checked against its digest."""
        url = api(repository) / "blobs" / digest

        async def handle(resp: aiohttp.ClientResponse) -> bytes:
            expect(resp, (200,), f"blob {digest}")
            return await read_bounded(resp, max_size, f"blob {digest}")

        data = await self.request("GET", registry, url, handle, scope=scope(repository))
        self.bytes_received += len(data)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            msg = f"blob {digest} from {registry}/{repository}: content hashes to {got}"
            raise DigestMismatch(msg)
        return data

    async def get_blob_to(  # noqa: PLR0913
        self, registry: str, repository: str, digest: str, max_size: int, out: BinaryIO
    ) -> int:
        """A whole blob streamed into `out` (a seekable file), checked against its digest.

        Memory stays at one network piece whatever the blob's size. Returns its length:
        only `out`'s first that many bytes are the blob (a failed attempt may have left
        more; `out` is not truncated, as ftruncate of an unlinked file fails on 9p).
        """
        url = api(repository) / "blobs" / digest

        async def handle(resp: aiohttp.ClientResponse) -> tuple[int, str]:
            expect(resp, (200,), f"blob {digest}")
            out.seek(0)  # a retried attempt starts again from the first byte
            sha, size = hashlib.sha256(), 0
            async for piece in iter_body(resp):
                size += len(piece)
                if size > max_size:
                    msg = f"blob {digest}: response is larger than {max_size} bytes"
                    raise FetchError(msg, retryable=False)
                sha.update(piece)
                out.write(piece)
            return size, "sha256:" + sha.hexdigest()

        size, got = await self.request("GET", registry, url, handle, scope=scope(repository))
        self.bytes_received += size
        if got != digest:
            msg = f"blob {digest} from {registry}/{repository}: content hashes to {got}"
            raise DigestMismatch(msg)
        out.flush()
        return size

    async def get_range(  # noqa: PLR0913
        self,
        registry: str,
        repository: str,
        digest: str,
        offset: int,
        length: int,
        priority: Priority = "demand",
    ) -> bytes:
        """Exactly `length` bytes at `offset` of a registry blob (not verified here)."""
        url = api(repository) / "blobs" / digest
        where = f"blob {digest} [{offset}, +{length})"

        async def handle(resp: aiohttp.ClientResponse) -> bytes:
            if resp.status == 206:  # noqa: PLR2004
                first = content_range_start(resp.headers.get("Content-Range", ""))
                if first is None or not 0 <= offset - first <= self.config.max_range:
                    msg = f"{where}: server sent a range starting at {first}"
                    raise RetryableError(msg)
                # Some servers and CDNs widen a range to their own alignment:
                # take our part of it, within a bound.
                skip = offset - first
                data = await read_bounded(resp, skip + length + self.config.max_range, where)
                data = data[skip : skip + length]
            elif resp.status == 200:  # noqa: PLR2004
                data = await self._skip_to_range(resp, registry, offset, length)
            else:
                expect(resp, (206,), where)
                data = b""
            if len(data) != length:
                msg = f"{where}: got {len(data)} bytes"
                raise RetryableError(msg)
            return data

        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        data = await self.request(
            "GET",
            registry,
            url,
            handle,
            scope=scope(repository),
            headers=headers,
            priority=priority,
        )
        self.bytes_received += len(data)
        return data

    async def _skip_to_range(
        self, resp: aiohttp.ClientResponse, registry: str, offset: int, length: int
    ) -> bytes:
        # A server (or proxy) that ignores Range sends the whole blob: keep the
        # part we asked for and drop the connection as soon as we have it.
        if registry not in self._range_ignored:
            self._range_ignored.add(registry)
            log.warning("registry_range_ignored", registry=registry)
        out = bytearray()
        pos = 0
        async for piece in iter_body(resp):
            lo, hi = max(offset - pos, 0), min(offset + length - pos, len(piece))
            if lo < hi:
                out += piece[lo:hi]
            pos += len(piece)
            if pos >= offset + length:
                break
        resp.close()
        self.bytes_received += pos - len(out)
        return bytes(out)

    async def has_blob(
        self, registry: str, repository: str, digest: str, *, actions: str = "pull"
    ) -> bool:
        url = api(repository) / "blobs" / digest

        async def handle(resp: aiohttp.ClientResponse) -> bool:
            expect(resp, (200, 404), f"blob {digest}")
            return resp.status == 200  # noqa: PLR2004

        return await self.request("HEAD", registry, url, handle, scope=scope(repository, actions))

    # -- writes -----------------------------------------------------------------
