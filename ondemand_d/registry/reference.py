# SPDX-License-Identifier: Apache-2.0
"""Image references: ``REGISTRY/REPO:TAG``, ``REGISTRY/REPO@sha256:HEX`` (no I/O).

The registry is always spelled out: ondemand-d has no default registry, so a
reference names exactly one host and nothing is guessed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ondemand_d.errors import ConfigError

# The grammar of the distribution spec (reference.go), reduced to what we need.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference. `digest`, when set, pins the manifest and wins over `tag`."""

    registry: str  # host[:port] as written, e.g. "127.0.0.1:5000"
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What goes after /manifests/ in a URL."""
        return self.digest or self.tag or "latest"

    @property
    def host(self) -> str:
        """The host without port or IPv6 brackets."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse(text: str) -> Reference:
    """Parse ``REGISTRY/REPO[:TAG][@sha256:HEX]``; the tag defaults to "latest".

    Raises:
        ConfigError: the text is not a reference; the message says which part.
    """
    # A digest's "@" has no "/" after it; one that has is user:password@host: never echo it.
    userinfo_end = max((i for i, c in enumerate(text) if c == "@" and "/" in text[i:]),
                       default=-1)
    if userinfo_end >= 0:
        shown = "***" + text[userinfo_end:]
        msg = (f"reference {shown!r} has credentials in it: remove them and log in with "
               "`docker login` (ondemand-d reads the Docker config)")
        raise ConfigError(msg)
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        msg = f"reference {text!r}: digest must be sha256:<64 hex>"
        raise ConfigError(msg)
    registry, slash, path = rest.partition("/")
    if not slash or not _HOST.fullmatch(registry):
        msg = f"reference {text!r}: expected REGISTRY/REPO:TAG (registry first)"
        raise ConfigError(msg)
    repository, tag = path, None
    if ":" in path.rsplit("/", 1)[-1]:
        repository, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            msg = f"reference {text!r}: bad tag {tag!r}"
            raise ConfigError(msg)
    if not _REPOSITORY.fullmatch(repository) or len(repository) > 255:  # noqa: PLR2004
        msg = f"reference {text!r}: bad repository {repository!r}"
        raise ConfigError(msg)
    if tag is None and not digest:
        tag = "latest"
    return Reference(registry, repository, tag, digest or None)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts plain HTTP is fine for."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
