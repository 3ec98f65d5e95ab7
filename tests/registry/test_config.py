# SPDX-License-Identifier: Apache-2.0
"""RegistryConfig and make_source: the shapes the daemon may hand over."""

from __future__ import annotations

from pathlib import Path

import pytest

from ondemand_d.config import load
from ondemand_d.errors import ConfigError
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.source import make_source


def test_make_source_from_daemon_config() -> None:
    """The daemon's Config ([registry] table) maps onto RegistryConfig; no I/O on creation."""
    text = ('[registry]\ndocker_config = "/etc/ondemand-d/docker.json"\n'
            'ca_file = "/etc/ssl/extra.pem"\ninsecure = ["build-cache:5000"]\n'
            'prefetch_bandwidth = "1M"\n')
    cfg = make_source(load(text)).config
    assert cfg.docker_config == Path("/etc/ondemand-d/docker.json")
    assert cfg.ca_file == Path("/etc/ssl/extra.pem")
    assert cfg.insecure == frozenset({"build-cache:5000"})
    assert cfg.prefetch_bandwidth == 1 << 20
    assert make_source(None).config == RegistryConfig()


def test_make_source_defaults_to_dockers_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset docker_config is Docker's own default location, as for `docker login`."""
    monkeypatch.setenv("DOCKER_CONFIG", "/srv/docker")
    assert make_source(load()).config.docker_config == Path("/srv/docker/config.json")


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
