# SPDX-License-Identifier: Apache-2.0
"""Blob and manifest uploads per the distribution spec (used by push only).

A blob goes up as POST /blobs/uploads/ then either one PUT ?digest= (monolithic,
up to MONOLITHIC_MAX) or PATCH parts with Content-Range and a closing PUT
?digest=. A failed upload is started over from the POST: a half-written
upload session cannot be trusted to hold what we think it does.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import aiohttp
import structlog

from ondemand_d.errors import FetchError
from ondemand_d.registry._http import api, expect, location, scope
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.reference import Reference

log = structlog.get_logger()
#: Blobs put in one request; bigger ones go up in PATCH parts of this size.
MONOLITHIC_MAX = 32 << 20


async def upload_blob(  # noqa: PLR0913 - the spec's parameters, spelled out
    client: RegistryClient,
    registry: str,
    repository: str,
    digest: str,
    size: int,
    read: Callable[[int, int], bytes],
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Upload a blob whose bytes `read(offset, n)` returns.

    `progress(bytes_sent)` is called after each PATCH part of a large blob.

    Raises:
        FetchError: the registry refused, or kept failing after retries.
    """
    for attempt in range(1 + client.config.retries):
        try:
            await _upload_once(client, registry, repository, digest, size, read, progress)
        except FetchError as exc:
            if not exc.retryable or attempt == client.config.retries:
                raise
            log.info("registry_upload_retry", registry=registry, digest=digest, attempt=attempt + 1)
            await asyncio.sleep(
                min(client.config.backoff_max, client.config.backoff_base * 2**attempt)
            )
        else:
            return


def _part(read: Callable[[int, int], bytes], offset: int, n: int) -> Callable[[], bytes]:
    return lambda: read(offset, n)


async def _upload_once(  # noqa: PLR0913
    client: RegistryClient,
    registry: str,
    repository: str,
    digest: str,
    size: int,
    read: Callable[[int, int], bytes],
    progress: Callable[[int], None] | None,
) -> None:
    push = scope(repository, "pull,push")
    start = api(repository) / "blobs" / "uploads" / ""
    # retries=0 below: one step of an upload session is not retried alone.
    url = await client.request("POST", registry, start, location(202), scope=push, retries=0)
    octets = {"Content-Type": "application/octet-stream"}
    if size <= MONOLITHIC_MAX:
        put = url.update_query({"digest": digest})
        body = _part(read, 0, size)
        await client.request(
            "PUT", registry, put, location(201), scope=push, headers=octets, body=body, retries=0
        )
        return
    for pos in range(0, size, MONOLITHIC_MAX):
        n = min(MONOLITHIC_MAX, size - pos)
        headers = {**octets, "Content-Range": f"{pos}-{pos + n - 1}"}
        url = await client.request(
            "PATCH", registry, url, location(202), scope=push, headers=headers,
            body=_part(read, pos, n), retries=0,
        )  # fmt: skip
        if progress is not None:
            progress(pos + n)
    put = url.update_query({"digest": digest})
    await client.request("PUT", registry, put, location(201), scope=push, retries=0)


async def put_manifest(client: RegistryClient, ref: Reference, data: bytes, media_type: str) -> str:
    """PUT a manifest under `ref` (tag or digest); return its digest."""
    url = api(ref.repository) / "manifests" / ref.ref

    async def handle(resp: aiohttp.ClientResponse) -> str:
        expect(resp, (201,), f"manifest {ref}")
        return resp.headers.get(
            "Docker-Content-Digest", "sha256:" + hashlib.sha256(data).hexdigest()
        )

    return await client.request(
        "PUT",
        ref.registry,
        url,
        handle,
        scope=scope(ref.repository, "pull,push"),
        headers={"Content-Type": media_type},
        body=lambda: data,
    )
