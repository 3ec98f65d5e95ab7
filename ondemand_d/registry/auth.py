# SPDX-License-Identifier: Apache-2.0
"""Registry credentials and authorization: docker config.json, challenges, tokens.

The flow is the distribution spec's: a request without credentials gets 401 and
``WWW-Authenticate: Bearer realm="...",service="...",scope="..."``; we GET the
realm (with basic credentials if we have some, anonymously otherwise), receive
a token and retry with ``Authorization: Bearer <token>``. A ``Basic`` challenge
is answered with the basic credentials directly. Secrets live only in
`Credentials` (whose repr is redacted) and in headers we build; neither is ever
logged or put in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from ondemand_d.errors import ConfigError, FetchError
from ondemand_d.registry._http import checked_url

log = structlog.get_logger()

#: Tokens without expires_in live 60 s (distribution token spec).
DEFAULT_TOKEN_TTL = 60.0
_PARAM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^",\s]*))\s*,?')


class Secret(str):
    """A str whose repr is redacted.

    Header values and passwords are held as Secret, so a traceback rendered
    with its frames' locals (structlog's dict_tracebacks does that) shows
    ``'<redacted>'`` where the value would be. str() and the bytes sent on the
    wire are unchanged.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password (or identity token) for one registry host."""

    username: str
    password: Secret = field(repr=False)

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    def basic(self) -> Secret:
        """The value of an ``Authorization: Basic`` header."""
        return Secret(
            "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        )


def _host_key(entry: str) -> str:
    """'https://reg.example:5000/v1/' -> 'reg.example:5000' (docker writes both forms)."""
    entry = entry.split("://", 1)[-1]
    return entry.split("/", 1)[0].lower()


def load_docker_config(path: Path | None) -> dict[str, Credentials]:
    """Read ``auths`` from a Docker-style config.json: host -> Credentials.

    A missing file means no credentials. Entries with ``auth`` (base64
    "user:password") or ``username``/``password`` are used; credential helpers
    are not supported and are skipped.

    Raises:
        ConfigError: the file exists but is not valid (the message never quotes a secret).
    """
    if path is None or not path.exists():
        return {}
    error: str | None = None
    try:
        return _parse_auths(path.read_bytes(), str(path))
    except ConfigError as exc:
        error = str(exc)
    # Raised here, from a frame that holds no part of the file: a traceback
    # rendered with locals cannot show a secret.
    raise ConfigError(error)


def _parse_auths(data: bytes, where: str) -> dict[str, Credentials]:
    try:
        raw = json.loads(data)
    except ValueError:
        msg = f"{where} is not valid JSON"
        raise ConfigError(msg) from None
    auths = raw.get("auths", {}) if isinstance(raw, dict) else None
    if not isinstance(auths, dict):
        msg = f"{where}: 'auths' is not an object"
        raise ConfigError(msg)
    creds: dict[str, Credentials] = {}
    for host, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = (
                    base64.b64decode(entry["auth"], validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError, ValueError):
                msg = f"{where}: auths[{host!r}].auth is not base64 user:password"
                raise ConfigError(msg) from None
            if not sep:
                msg = f"{where}: auths[{host!r}].auth has no ':'"
                raise ConfigError(msg)
            creds[_host_key(host)] = Credentials(user, Secret(password))
        elif entry.get("username") and entry.get("password"):
            creds[_host_key(host)] = Credentials(str(entry["username"]), Secret(entry["password"]))
    return creds


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="x",service="y"`` into ("bearer", {"realm": "x", ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


@dataclass
class _Token:
    header: Secret = field(repr=False)
    expires: float


class Authenticator:
    """Answers 401 challenges and remembers the result per (host, scope)."""

    def __init__(self, credentials: dict[str, Credentials]) -> None:
        self._credentials = credentials
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic_hosts: set[str] = set()

    def credentials_for(self, registry: str) -> Credentials | None:
        return self._credentials.get(registry.lower())

    def header(self, registry: str, scope: str) -> Secret | None:
        """The Authorization header to send up front, if an earlier challenge taught us one."""
        token = self._tokens.get((registry, scope))
        if token is not None and token.expires > time.monotonic():
            return token.header
        creds = self.credentials_for(registry)
        if registry in self._basic_hosts and creds is not None:
            return creds.basic()
        return None

    async def answer(  # noqa: PLR0913 - the challenge and what answering it needs
        self,
        session: aiohttp.ClientSession,
        registry: str,
        scope: str,
        challenge: str,
        timeout: aiohttp.ClientTimeout,
        plain_ok: Callable[[str], bool],
    ) -> Secret:
        """Turn a WWW-Authenticate challenge into an Authorization header value.

        `plain_ok(host)` says whether credentials may travel over plain http to
        `host` (the token realm may live on another host than the registry).

        Raises:
            FetchError: no usable credentials, or the token server refused or failed.
        """
        scheme, params = parse_challenge(challenge)
        creds = self.credentials_for(registry)
        if scheme == "basic":
            if creds is None:
                msg = f"{registry} wants basic credentials and none are configured"
                raise FetchError(msg, retryable=False)
            self._basic_hosts.add(registry)
            return creds.basic()
        if scheme != "bearer" or "realm" not in params:
            msg = f"{registry}: unsupported auth challenge scheme {scheme!r}"
            raise FetchError(msg, retryable=False)
        query = [("service", params["service"])] if "service" in params else []
        scopes = [scope] if scope else []
        if params.get("scope") and params["scope"] not in scopes:
            scopes.append(params["scope"])
        query += [("scope", s) for s in scopes]
        headers = {"Authorization": creds.basic()} if creds is not None else {}
        realm = checked_url(params["realm"], f"{registry}: bearer token realm")
        if realm.scheme != "https" and not (
            realm.scheme == "http" and plain_ok(realm.raw_authority or "")
        ):
            msg = f"{registry}: refusing token realm {realm.scheme}://{realm.host} (not https)"
            raise FetchError(msg, retryable=False)
        try:
            # No redirects: they could carry the basic credentials elsewhere.
            async with session.get(
                realm, params=query, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            msg = f"token server for {registry}: {type(exc).__name__}"
            raise FetchError(msg, retryable=True) from None
        if status in (401, 403):
            msg = f"token server for {registry} refused the credentials (HTTP {status})"
            raise FetchError(
                msg,
                retryable=False,
            )
        if status != 200:  # noqa: PLR2004
            msg = f"token server for {registry} answered HTTP {status}"
            raise FetchError(msg, retryable=status >= 500)  # noqa: PLR2004 - 5xx
        try:
            raw: Any = json.loads(body)
            value = raw.get("token") or raw.get("access_token")
            ttl = float(raw.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            msg = f"token server for {registry} sent no token"
            raise FetchError(msg, retryable=False)
        header = Secret(f"Bearer {value}")
        # Renew a little early so a token never expires in flight.
        self._tokens[(registry, scope)] = _Token(header, time.monotonic() + max(ttl - 10, ttl / 2))
        log.debug("registry_token_issued", registry=registry, scope=scope, ttl_s=ttl)
        return header

    def forget(self, registry: str, scope: str) -> None:
        self._tokens.pop((registry, scope), None)
