# SPDX-License-Identifier: Apache-2.0
"""RegistryConfig: how to talk to registries. A frozen value; building it does no I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondemand_d.errors import ConfigError


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

    docker_config: Path | None = None
    ca_file: Path | None = None
    insecure: frozenset[str] = field(default_factory=frozenset)
    concurrency: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    request_timeout: float = 120.0
    fetch_deadline: float = 180.0
    retries: int = 4
    backoff_base: float = 0.2
    backoff_max: float = 5.0
    max_range: int = 8 << 20
    prefetch_concurrency: int = 2
    prefetch_bandwidth: int = 0

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
