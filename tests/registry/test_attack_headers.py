# SPDX-License-Identifier: Apache-2.0
"""A registry's malformed Location header or bearer realm: one FetchError sentence.

yarl raises ValueError on some URLs (an unclosed IPv6 bracket, a port over 65535); it escaped
the client as a bare ValueError ("Task exception was never retrieved" in the daemon).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ondemand_d.errors import FetchError
from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource
from ondemand_d.store.local import LocalStore

from ._proxy import Fault, FaultProxy
from .conftest import BOUND_S, FAST, Registry, make_image

MALFORMED = ["http://[::1", "http://host:99999/x", "http://a b/x", "ftp://host/x", "http://:80/"]


@pytest.mark.parametrize("where", ["manifest", "blob"])
@pytest.mark.parametrize("value", MALFORMED)
@pytest.mark.parametrize("header", ["Location", "realm"])
async def test_malformed_location_or_realm_is_one_fetch_error(
    registry: Registry, tmp_path: Path, header: str, value: str, where: str
) -> None:
    """A 307 with a malformed Location, or a 401 whose bearer realm is malformed, on the
    manifest (`add`) or on a blob range (a READ's fetch): a FetchError that names the header,
    not retried, and no task left with an unretrieved exception."""
    src = LocalStore(tmp_path / "src")
    name = f"hostile-{header.lower()}-{where}-{MALFORMED.index(value)}"
    image = make_image(src, tmp_path, name, (4096, 100_000))
    async with RegistryClient(FAST) as client:
        await push(src, image.name, reference.parse(f"{registry.host}/attack/{name}:v1"), client)
    proxy = await FaultProxy(registry.host).start()
    unretrieved: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    if header == "Location":
        fault = Fault("status", times=100, status=307, headers=f"Location: {value}\r\n")
    else:
        fault = Fault("status", times=100, status=401,
                      headers=f'WWW-Authenticate: Bearer realm="{value}",service="s"\r\n')
    ref = reference.parse(f"{proxy.host}/attack/{name}:v1")
    dst = LocalStore(tmp_path / "dst")
    try:
        if where == "manifest":
            fault.match = "/manifests/"
            proxy.add(fault)
            async with RegistryClient(FAST) as client:
                with pytest.raises(FetchError) as caught:
                    await asyncio.wait_for(add(dst, ref, client), BOUND_S)
        else:
            async with RegistryClient(FAST) as client:
                await asyncio.wait_for(add(dst, ref, client), BOUND_S)
            proxy.add(fault)
            source = RegistrySource(FAST)
            blob = dst.get_blob(image.devices[0][1])
            try:
                with pytest.raises(FetchError) as caught:
                    await asyncio.wait_for(source.fetch(blob, blob.chunks[:1]), BOUND_S)
            finally:
                await source.aclose()
    finally:
        await proxy.stop()
        loop.set_exception_handler(None)
    what = "redirect Location" if header == "Location" else "bearer token realm"
    assert what in str(caught.value) and "malformed header" in str(caught.value)
    assert not caught.value.retryable
    assert fault.times == 99  # asked once: a malformed header is not worth another try
    assert unretrieved == []
