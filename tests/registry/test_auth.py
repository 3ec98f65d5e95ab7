# SPDX-License-Identifier: Apache-2.0
"""Authentication against real registries: htpasswd (Basic) and bearer tokens.

Also: credentials never reach logs or exception messages, and Authorization is
never sent to a host the registry redirected us to.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

from ondemand_d.errors import ConfigError, FetchError
from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.auth import (
    Authenticator,
    Credentials,
    load_docker_config,
    parse_challenge,
)
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.registry.source import RegistrySource
from ondemand_d.store.local import LocalStore

from ._proxy import Fault, FaultProxy
from .conftest import PASSWORD, USER, Registry, blob_bytes, docker_config, make_image

SECRET_FORMS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


def _assert_no_secret(text: str) -> None:
    for secret in SECRET_FORMS:
        assert secret not in text


async def _round_trip(reg: Registry, tmp_path: Path, cfg: RegistryConfig, repo: str) -> None:
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, repo.replace("/", "-"), (4096, 300_000))
    ref = reference.parse(f"{reg.host}/{repo}:v1")
    dst = LocalStore(tmp_path / "dst")
    async with RegistryClient(cfg) as client:
        await push(src, image.name, ref, client)
        await add(dst, ref, client)
    source = RegistrySource(cfg)
    try:
        blob = dst.get_blob(image.devices[0][1])
        got = await asyncio.wait_for(source.fetch(blob, blob.chunks), 20)
    finally:
        await source.aclose()
    assert b"".join(got) == blob_bytes(src, blob.blob_id)


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
async def test_round_trip_with_credentials_and_no_leak(
    kind: str, htpasswd_registry: Registry, token_registry: Registry, tmp_path: Path
) -> None:
    """push/add/fetch work with credentials from config.json, and no log line shows them."""
    reg = htpasswd_registry if kind == "htpasswd" else token_registry
    cfg = RegistryConfig(docker_config=docker_config(tmp_path / "config.json", reg.host))
    with capture_logs() as logs:
        await _round_trip(reg, tmp_path, cfg, f"auth/{kind}")
    assert logs
    _assert_no_secret(repr(logs))
    if kind == "token":
        assert reg.tokens is not None
        assert reg.tokens.requests and all(r["basic"] for r in reg.tokens.requests)


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
async def test_wrong_password_is_a_clean_error(
    kind: str, htpasswd_registry: Registry, token_registry: Registry, tmp_path: Path
) -> None:
    """Bad credentials end in a non-retryable FetchError that does not quote them."""
    reg = htpasswd_registry if kind == "htpasswd" else token_registry
    cfg = RegistryConfig(
        docker_config=docker_config(tmp_path / "c.json", reg.host, password=PASSWORD + "x")
    )
    ref = reference.parse(f"{reg.host}/auth/missing:v1")
    with capture_logs() as logs:
        async with RegistryClient(cfg) as client:
            with pytest.raises(FetchError) as info:
                await asyncio.wait_for(add(LocalStore(tmp_path / "dst"), ref, client), 20)
    assert not info.value.retryable
    # Even a traceback rendered with every frame's locals (dict_tracebacks) shows none.
    trace = structlog.tracebacks.extract(
        type(info.value), info.value, info.value.__traceback__, show_locals=True
    )
    wrong = base64.b64encode(f"{USER}:{PASSWORD}x".encode()).decode()
    for secret in (*SECRET_FORMS, PASSWORD + "x", wrong):
        assert secret not in str(info.value) and secret not in repr(logs)
        assert secret not in repr(trace)


async def test_anonymous_is_refused(token_registry: Registry, tmp_path: Path) -> None:
    """Without credentials the token grants nothing and the pull is refused, not retried."""
    ref = reference.parse(f"{token_registry.host}/auth/anon:v1")
    async with RegistryClient(RegistryConfig()) as client:
        with pytest.raises(FetchError, match="access denied|not found"):
            await asyncio.wait_for(add(LocalStore(tmp_path / "dst"), ref, client), 20)


async def test_authorization_not_sent_to_redirect_target(
    htpasswd_registry: Registry, tmp_path: Path
) -> None:
    """After a 307 to another host (blob storage), the request carries no Authorization."""
    cfg = RegistryConfig(
        docker_config=docker_config(tmp_path / "config.json", htpasswd_registry.host)
    )
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "redir", (4096, 100_000))
    async with RegistryClient(cfg) as client:
        await push(src, "redir", reference.parse(f"{htpasswd_registry.host}/auth/redir:v1"), client)
    proxy = await FaultProxy(htpasswd_registry.host).start()
    proxy.storage_authorization = Credentials(USER, PASSWORD).basic()  # stands in for a signed URL
    try:
        proxy_cfg = RegistryConfig(docker_config=docker_config(tmp_path / "p.json", proxy.host))
        dst = LocalStore(tmp_path / "dst")
        async with RegistryClient(proxy_cfg) as client:
            await add(dst, reference.parse(f"{proxy.host}/auth/redir:v1"), client)
        proxy.add(Fault("redirect", times=100))
        source = RegistrySource(proxy_cfg)
        blob = dst.get_blob(image.devices[0][1])
        try:
            got = await asyncio.wait_for(source.fetch(blob, blob.chunks[:2]), 20)
        finally:
            await source.aclose()
    finally:
        await proxy.stop()
    assert b"".join(got) == blob_bytes(src, blob.blob_id)[: blob.chunks[1].end]
    storage = [s for s in proxy.seen if s.host.startswith("localhost")]
    assert storage and not any(s.authorization for s in storage)
    assert any(s.authorization for s in proxy.seen if s.host.startswith("127.0.0.1"))


def test_docker_config_parsing(tmp_path: Path) -> None:
    """auths entries in both spellings are read; a bad one is a ConfigError without the secret."""
    path = tmp_path / "config.json"
    path.write_text(
        '{"auths": {"https://reg.example:5000/v1/": {"auth": "%s"}, "other.example": '
        '{"username": "u", "password": "p"}, "helper.example": {}}}'
        % base64.b64encode(b"bob:x:y").decode()
    )
    creds = load_docker_config(path)
    assert creds["reg.example:5000"] == Credentials("bob", "x:y")
    assert creds["other.example"] == Credentials("u", "p")
    assert "helper.example" not in creds
    assert "x:y" not in repr(creds)
    path.write_text(
        '{"auths": {"r": {"auth": "%s"}}}' % base64.b64encode(b"nocolon-secret").decode()
    )
    with pytest.raises(ConfigError) as info:
        load_docker_config(path)
    assert "nocolon-secret" not in str(info.value)
    assert load_docker_config(tmp_path / "absent.json") == {}


def test_parse_challenge() -> None:
    """Bearer parameters are split correctly, including quoted commas."""
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


async def test_tls_with_ca_file(tls_registry: Registry, tmp_path: Path) -> None:
    """A loopback registry that speaks TLS is used over TLS, trusted through ca_file."""
    cfg = RegistryConfig(ca_file=tls_registry.ca_file)
    await _round_trip(tls_registry, tmp_path, cfg, "tls/ok")
    async with RegistryClient(cfg) as client:
        assert (await client.base(tls_registry.host)).scheme == "https"


async def test_tls_untrusted_is_not_downgraded(tls_registry: Registry, tmp_path: Path) -> None:
    """Without the CA the request fails at once (not retried, not retried over http)."""
    ref = reference.parse(f"{tls_registry.host}/tls/untrusted:v1")
    async with RegistryClient(RegistryConfig()) as client:
        with pytest.raises(FetchError, match="certificate not trusted") as info:
            await asyncio.wait_for(add(LocalStore(tmp_path / "dst"), ref, client), 10)
        assert (await client.base(tls_registry.host)).scheme == "https"
    assert not info.value.retryable


async def test_plain_http_only_where_allowed(registry: Registry) -> None:
    """A non-loopback host is https only; listing it as insecure allows http."""
    async with RegistryClient(RegistryConfig(insecure=frozenset({"reg.example:5000"}))) as client:
        assert not client.may_use_http("reg.example")
        assert client.may_use_http("reg.example:5000")
        assert client.may_use_http("127.0.0.1:1") and client.may_use_http("localhost:5000")
        assert (await client.base("reg.example")).scheme == "https"
        assert (await client.base(registry.host)).scheme == "http"


async def test_credentials_never_sent_to_a_plain_http_realm() -> None:
    """A challenge naming an http:// realm on a non-loopback host is refused before any I/O."""
    auth = Authenticator({"reg.example": Credentials(USER, PASSWORD)})
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError, match="not https") as info:
            await auth.answer(
                session,
                "reg.example",
                "repository:a:pull",
                'Bearer realm="http://auth.example/token",service="s"',
                aiohttp.ClientTimeout(total=1),
                lambda host: False,
            )
    assert not info.value.retryable
    _assert_no_secret(str(info.value))
