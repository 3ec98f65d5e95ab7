# SPDX-License-Identifier: Apache-2.0
"""Daemon configuration: defaults < TOML file < ONDEMAND_D_* environment < CLI flags.

`load` is pure: it gets the file's text, the environment and the flags, and
returns a frozen Config. Every error names the key that is wrong.
"""
from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ondemand_d.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/ondemand-d/config.toml")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
NATIVE = ("auto", "cffi", "python")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `ondemand-d serve` needs to know."""

    store: Path = Path("/var/lib/ondemand-d/store")
    cache_dir: Path = Path("/var/cache/ondemand-d")
    tag: str = "ondemand-d"
    device: Path = Path("/dev/cachefiles")
    concurrency: int = 64  # READs filled at once; more wait in the kernel's queue
    io_threads: int = 4  # threads for store reads and anon-fd writes
    prefill_bootstrap: bool = True  # write a bootstrap whole right after its copen
    prefetch: bool = False  # write data blobs whole in the background after OPEN
    readahead: int = 4 << 20  # bytes written past each READ before the kernel asks; 0: off
    write_through: bool = True  # keep remotely fetched chunks in the local store
    registry_config: Path | None = None  # Docker-style config.json with credentials
    ca_file: Path | None = None
    insecure_registries: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    log_format: str = "auto"
    log_level: str = "info"
    native: str = "auto"
    control_socket: Path | None = Path("/run/ondemand-d/control.sock")  # root-only; "" = none
    images_dir: Path | None = None  # serve plain image files named by cookie key, unverified
    hung_read_after: float = 30.0  # seconds; older READs are flagged, and stop the watchdog


_ENV_PREFIX = "ONDEMAND_D_"


def _convert(name: str, raw: Any, default: Any) -> Any:  # noqa: PLR0911 - one branch per type
    """Turn a TOML, env or CLI value into the type of the field's default."""
    kind = Config.__dataclass_fields__[name].type
    try:
        if "Path" in str(kind):
            return None if raw in (None, "") else Path(str(raw))
        if "tuple" in str(kind):
            if isinstance(raw, str):
                return tuple(s.strip() for s in raw.split(",") if s.strip())
            return tuple(str(s) for s in raw)
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        msg = f"config key {name!r}: cannot use {raw!r} (expected {kind})"
        raise ConfigError(msg) from None


def load(
    file_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    source: str = "config file",
) -> Config:
    """Merge the layers into a Config and check it.

    Raises:
        ConfigError: unknown key, bad value or bad TOML; the message names it.
    """
    names = {f.name: f.default for f in fields(Config)}
    values: dict[str, Any] = {}
    if file_text is not None:
        try:
            table = tomllib.loads(file_text)
        except tomllib.TOMLDecodeError as exc:
            msg = f"{source}: {exc}"
            raise ConfigError(msg) from None
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in names:
                msg = f"{source}: unknown key {key!r} (known: {', '.join(sorted(names))})"
                raise ConfigError(msg)
            values[name] = _convert(name, raw, names[name])
    for key, raw in (environ or {}).items():
        if key.startswith(_ENV_PREFIX):
            name = key[len(_ENV_PREFIX) :].lower()
            if name in names and name != "native":  # ONDEMAND_D_NATIVE is read by _native
                values[name] = _convert(name, raw, names[name])
    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = _convert(name, raw, names[name])
    cfg = replace(Config(), **values)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.log_format not in LOG_FORMATS:
        msg = f"config key 'log_format': {cfg.log_format!r} is not one of {LOG_FORMATS}"
        raise ConfigError(msg)
    if cfg.log_level not in LOG_LEVELS:
        msg = f"config key 'log_level': {cfg.log_level!r} is not one of {LOG_LEVELS}"
        raise ConfigError(msg)
    if cfg.native not in NATIVE:
        msg = f"config key 'native': {cfg.native!r} is not one of {NATIVE}"
        raise ConfigError(msg)
    if not 1 <= cfg.concurrency <= 4096:  # noqa: PLR2004
        msg = f"config key 'concurrency': {cfg.concurrency} is not in 1..4096"
        raise ConfigError(msg)
    if not 0 <= cfg.readahead <= 1 << 30:
        msg = f"config key 'readahead': {cfg.readahead} is not in 0..1 GiB"
        raise ConfigError(msg)
    if not 1 <= cfg.io_threads <= 256:  # noqa: PLR2004
        msg = f"config key 'io_threads': {cfg.io_threads} is not in 1..256"
        raise ConfigError(msg)
    if not cfg.tag or any(c.isspace() for c in cfg.tag) or len(cfg.tag) > 64:  # noqa: PLR2004
        msg = f"config key 'tag': {cfg.tag!r} must be 1-64 characters without spaces"
        raise ConfigError(msg)
    if cfg.hung_read_after <= 0:
        msg = f"config key 'hung_read_after': {cfg.hung_read_after} must be above 0 seconds"
        raise ConfigError(msg)
    if not cfg.cache_dir.is_absolute():
        msg = f"config key 'cache_dir': {cfg.cache_dir} must be an absolute path"
        raise ConfigError(msg)
