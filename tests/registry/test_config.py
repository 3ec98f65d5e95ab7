# SPDX-License-Identifier: Apache-2.0
"""RegistryConfig and make_source: the shapes the daemon may hand over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ondemand_d.errors import ConfigError
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.source import make_source


@dataclass(frozen=True)
class DaemonConfig:
    """Stands in for ondemand_d.config.Config (the fields make_source reads)."""

    registry_config: Path | None = Path("/etc/ondemand-d/docker.json")
    ca_file: Path | None = Path("/etc/ssl/extra.pem")
    insecure_registries: tuple[str, ...] = ("build-cache:5000",)
    registry_prefetch_bandwidth: int | None = 1 << 20


def test_make_source_from_daemon_config() -> None:
    """The daemon's Config maps onto RegistryConfig; creating the source does no I/O."""
    cfg = make_source(DaemonConfig()).config
    assert cfg.docker_config == Path("/etc/ondemand-d/docker.json")
    assert cfg.ca_file == Path("/etc/ssl/extra.pem")
    assert cfg.insecure == frozenset({"build-cache:5000"})
    assert cfg.prefetch_bandwidth == 1 << 20
    assert make_source(None).config == RegistryConfig()


def test_make_source_from_table() -> None:
    """A [registry] TOML table works; unknown keys and bad values are ConfigError."""
    table = {"ca_file": "/x.pem", "insecure": ["a:1"], "concurrency": 4}
    cfg = make_source(table).config
    assert cfg.ca_file == Path("/x.pem") and cfg.insecure == frozenset({"a:1"})
    assert cfg.concurrency == 4
    with pytest.raises(ConfigError, match="colour"):
        RegistryConfig.from_mapping({"colour": "blue"})
    with pytest.raises(ConfigError, match="prefetch_concurrency"):
        RegistryConfig(concurrency=2, prefetch_concurrency=3)
    with pytest.raises(ConfigError, match="concurrency"):
        RegistryConfig(concurrency=0)
