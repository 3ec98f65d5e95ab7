# SPDX-License-Identifier: Apache-2.0
"""RegistryConfig: how to talk to registries. A frozen value; building it does no I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ondemand_d.errors import ConfigError
from ondemand_d.setting import setting


def default_docker_config() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json (what docker itself reads)."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Settings for every registry the daemon or the CLI talks to.

    Attributes:
        docker_config: a Docker-style config.json with ``auths`` (None: no credentials).
        ca_file: PEM bundle trusted in addition to the system store.
        insecure: hosts ("host" or "host:port") spoken to over plain HTTP.
            Loopback hosts always are; every other host is HTTPS only.
        concurrency: requests in flight per registry host.
        connect_timeout, read_timeout: seconds; read is per socket read, so a
            slow but moving transfer is fine and a stalled one is not.
        request_timeout: seconds for one whole attempt (headers and body).
        fetch_deadline: seconds one `RegistrySource.fetch` may take in all,
            retries included; past it the READ fails (retryable) instead of waiting on.
        retries: attempts after the first, for connection errors, 5xx and 429.
        backoff_base, backoff_max: exponential backoff (with jitter) in seconds.
        max_range: largest merged Range GET in bytes.
        prefetch_concurrency: requests in flight per host for prefetch (< concurrency,
            so demand reads always find a free slot).
        prefetch_bandwidth: bytes/s cap for prefetch per source; 0 = no cap.
    """

    docker_config: Path | None = setting(
        None, "Docker-style config.json with registry credentials (default: "
        "$DOCKER_CONFIG/config.json or ~/.docker/config.json)")
    ca_file: Path | None = setting(None, "extra CA certificates (PEM) for registries' TLS")
    insecure: frozenset[str] = setting(
        doc="registries (host or host:port) spoken to over plain HTTP; loopback always is",
        default_factory=frozenset)
    concurrency: int = setting(8, "requests in flight per registry host", between=(1, 1024))
    connect_timeout: float = setting(10.0, "seconds to connect", between=(0.001, 3600))
    read_timeout: float = setting(30.0, "seconds one socket read may wait",
                                  between=(0.001, 3600))
    request_timeout: float = setting(120.0, "seconds for one whole request",
                                     between=(0.001, 86400))
    fetch_deadline: float = setting(180.0, "seconds one chunk fetch may take, retries "
                                    "included", between=(0.001, 86400))
    retries: int = setting(4, "attempts after the first (connection errors, 5xx, 429)",
                           between=(0, 100))
    backoff_base: float = setting(0.2, "first retry backoff in seconds", between=(0, 3600))
    backoff_max: float = setting(5.0, "longest retry backoff in seconds", between=(0, 3600))
    max_range: int = setting(8 << 20, "largest merged Range GET", size=True,
                             between=(4096, 1 << 30))
    prefetch_concurrency: int = setting(2, "requests in flight per host for prefetch "
                                        "(at most concurrency)", between=(1, 1024))
    prefetch_bandwidth: int = setting(0, "bytes/s cap for prefetch per source (0: none)",
                                      size=True, between=(0, 1 << 40))

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            msg = f"registry.concurrency must be >= 1, not {self.concurrency}"
            raise ConfigError(msg)
        if not 0 < self.prefetch_concurrency <= self.concurrency:
            msg = "registry.prefetch_concurrency must be in 1..concurrency"
            raise ConfigError(msg)
        checks = {
            "retries": self.retries >= 0,
            "prefetch_bandwidth": self.prefetch_bandwidth >= 0,
            "max_range": self.max_range >= 4096,  # noqa: PLR2004 - one page
            "connect_timeout": self.connect_timeout > 0,
            "read_timeout": self.read_timeout > 0,
            "request_timeout": self.request_timeout > 0,
            "fetch_deadline": self.fetch_deadline > 0,
            "backoff_base": 0 <= self.backoff_base <= self.backoff_max,
        }
        for key, ok in checks.items():
            if not ok:
                msg = f"registry.{key} is out of range: {getattr(self, key)!r}"
                raise ConfigError(msg)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> RegistryConfig:
        """Build from a TOML table (e.g. ``[registry]``); unknown keys are a ConfigError."""
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            msg = f"unknown registry key(s): {', '.join(sorted(unknown))}"
            raise ConfigError(msg)
        values: dict[str, Any] = dict(raw)
        for key in ("docker_config", "ca_file"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        if "insecure" in values:
            values["insecure"] = frozenset(str(h) for h in values["insecure"])
        try:
            return cls(**values)
        except TypeError as exc:
            msg = f"registry config: {exc}"
            raise ConfigError(msg) from None
