# SPDX-License-Identifier: Apache-2.0
"""The configuration: defaults < TOML file < ONDEMAND_D_* environment < command-line flags.

One typed key, three spellings. ``readahead`` is ``readahead = "4M"`` in the file,
``ONDEMAND_D_READAHEAD=4M`` in the environment and ``--readahead 4M`` on ``serve``; a key of
the ``[registry]`` table, e.g. ``concurrency``, is ``ONDEMAND_D_REGISTRY_CONCURRENCY`` and
``--registry-concurrency``. Every spelling goes through the same :func:`convert`, so a value
means the same wherever it is written, and every error names the key and where it came from.

**Adding a key is a one-place change**: add a field with :func:`setting` to :class:`Config`
(or to :class:`~ondemand_d.registry.config.RegistryConfig` for the ``[registry]`` table)::

    control_socket: Path = setting(Path("/run/ondemand-d/control"),
                                   "the control socket's path")

The type annotation decides the parsing (``Path``, ``Path | None``, ``int``, ``float``, ``bool``,
``str``, ``tuple[str, ...]``/``frozenset[str]`` as a TOML list or a comma-separated string);
``size=True`` also accepts ``64K``/``4M``/``1G``; ``choices``, ``between`` and ``check`` (a
function that says what is wrong with a value) check it.
The file, the environment variable and the ``serve`` flag (``flag=False`` for none) then exist
without further code; add the key to ``systemd/config.toml.example`` (a test checks that every
key is there) and a line to ``tests/unit/test_config.py``'s table of keys.

`load` is pure: it gets the file's text, the environment and the flags, and returns a frozen
Config.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ondemand_d.errors import ConfigError, UsageError
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.setting import parse_size, setting, show_size

__all__ = ["DEFAULT_CONFIG_PATH", "KEYS", "Config", "ConfigError", "Key", "convert", "load",
           "parse_size", "setting"]

DEFAULT_CONFIG_PATH = Path("/etc/ondemand-d/config.toml")
ENV_PREFIX = "ONDEMAND_D_"
#: Tables of the TOML file: each is one dataclass field of Config holding a settings dataclass.
TABLES = ("registry",)
#: Keys that moved, so an old config file gets a hint instead of a bare "unknown key".
MOVED = {"registry_config": "[registry] docker_config", "ca_file": "[registry] ca_file",
         "insecure_registries": "[registry] insecure"}


def _tag(tag: str) -> str | None:
    if not tag or len(tag) > 64 or any(c.isspace() for c in tag):  # noqa: PLR2004
        return "must be 1-64 characters without spaces"
    return None


def _absolute(path: Path) -> str | None:
    return None if path.is_absolute() else "must be an absolute path"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the commands and `ondemand-d serve` need to know (see the module doc)."""

    store: Path = setting(Path("/var/lib/ondemand-d/store"), "the store directory", flag=False)
    cache_dir: Path = setting(Path("/var/cache/ondemand-d"),
                              "cachefiles cache directory (ext4, xfs or btrfs; not tmpfs)",
                              check=_absolute)
    tag: str = setting("ondemand-d", "cachefiles cache tag (1-64 characters, no spaces)",
                       check=_tag)
    device: Path = setting(Path("/dev/cachefiles"), "the cachefiles devnode")
    concurrency: int = setting(64, "READs filled at once; more wait in the kernel's queue",
                               between=(1, 4096))
    io_threads: int = setting(4, "threads for store reads and cache writes", between=(1, 256))
    prefill_bootstrap: bool = setting(True, "write a bootstrap whole right after its OPEN")
    prefetch: bool = setting(False, "write data blobs whole in the background after OPEN")
    readahead: int = setting(4 << 20, "after each READ, write this much of what follows "
                             "(0: off)", size=True, between=(0, 1 << 30))
    write_through: bool = setting(True, "keep chunks fetched from a registry in the store")
    shutdown_timeout: float = setting(30.0, "seconds SIGTERM waits for READs in flight",
                                      between=(0, 3600))
    log_format: str = setting("auto", "auto: readable on a TTY, JSON lines otherwise",
                              choices=("auto", "json", "console"))
    log_level: str = setting("info", "debug shows each step of every READ",
                             choices=("debug", "info", "warning", "error"), flag=False)
    log_target: str = setting("stdout", "where serve writes its log: stdout, or stderr (what "
                              "scripts that capture a daemon's stderr expect)",
                              choices=("stdout", "stderr"))
    native: str = setting("auto", "READ fill backend: the C shim (cffi) or pure Python",
                          choices=("auto", "cffi", "python"),
                          aliases={"0": "python", "1": "cffi"})  # ONDEMAND_D_NATIVE's old ones
    control_socket: Path | None = setting(Path("/run/ondemand-d/control.sock"),
                                          'the control socket (root only; "" turns it off)')
    control_idle_timeout: float = setting(30.0, "seconds a control connection may take to send "
                                          "a whole request (a running trace is exempt)",
                                          between=(0.01, 3600))
    control_max_connections: int = setting(32, "control connections served at once; more are "
                                           "refused", between=(1, 1024))
    images_dir: Path | None = setting(
        None, "serve the EROFS image files in DIR by name (fsid=FILE), without importing and "
        "WITHOUT verifying anything (for debugging kernels and images)", flag="--images")
    images_max_size: int = setting(1 << 40, "largest image file --images serves (a bigger "
                                   "one is refused at OPEN)", size=True,
                                   between=(4096, 1 << 50), flag=False)
    max_chunk: int = setting(4 << 20, "largest chunk accepted from an image at add and import",
                             size=True, between=(4096, 1 << 30), flag=False)
    hung_read_after: float = setting(30.0, "seconds after which a READ is flagged HUNG and "
                                     "stops the watchdog", between=(0.001, 86400))
    # Why 30 s: a local chunk read takes milliseconds; only a store on a hung filesystem
    # (NFS, FUSE) takes this long, and the kernel's own READ waits are far longer.
    local_read_timeout: float = setting(30.0, "seconds a read of the local store may take "
                                        "before its READ fails (a hung NFS or FUSE store)",
                                        between=(0.001, 86400), flag=False)
    max_bootstrap: int = setting(256 << 20, "largest bootstrap (decoded) accepted at add and "
                                 "import", size=True, between=(4096, 1 << 50), flag=False)
    max_image: int = setting(64 << 30, "largest total size an image may declare at add and "
                             "import", size=True, between=(4096, 1 << 60), flag=False)
    cache_max: int = setting(0, "bytes the cache files may take; unused ones are removed "
                             "first (0: the disk is the limit)", size=True, between=(0, 1 << 60))
    mount_nosuid: bool = setting(True, "fanotify mounts are nosuid,nodev (false: setuid files "
                                 "and device nodes of images take effect; trusted images only)")
    holder_grace: float = setting(30.0, "seconds the fd holder keeps readers waiting for a "
                                  "restarted daemon before it answers them with EIO",
                                  between=(0, 86400))
    registry: RegistryConfig = field(default_factory=RegistryConfig)


@dataclass(frozen=True, slots=True)
class Key:
    """One key as the three places spell it."""

    name: str            # flat name: "readahead", "registry_concurrency"
    table: str | None    # "registry" for a key of the [registry] table
    field: dataclasses.Field[Any]

    @property
    def toml(self) -> str:
        return f"[{self.table}] {self.field.name}" if self.table else self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        spelled = self.meta.get("flag")
        return spelled if isinstance(spelled, str) else "--" + self.name.replace("_", "-")

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


def keys() -> Iterator[Key]:
    """Every key: Config's own, then each table's."""
    for f in fields(Config):
        if f.name in TABLES:
            for sub in fields(f.default_factory()):  # type: ignore[misc]
                yield Key(f"{f.name}_{sub.name}", f.name, sub)
        else:
            yield Key(f.name, None, f)


KEYS = {k.name: k for k in keys()}


def convert(key: Key, raw: Any) -> Any:
    """Turn a TOML, environment or flag value into the key's type, checked.

    Raises:
        ValueError: with the reason (the caller adds the key and where it came from).
    """
    kind = str(key.field.type)
    meta = key.meta
    value = _typed(key, kind, raw)
    problem = meta["check"](value) if meta.get("check") and value is not None else None
    if problem:
        raise ValueError(problem)
    return value


def _typed(key: Key, kind: str, raw: Any) -> Any:  # noqa: PLR0911, PLR0912 - one branch per type
    meta = key.meta
    if "Path" in kind:
        if raw in (None, ""):
            if "None" in kind:
                return None
            raise ValueError("needs a path")
        if not isinstance(raw, str | Path):
            raise ValueError("needs a path as a string")
        return Path(raw)
    if "tuple" in kind or "frozenset" in kind:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple | frozenset) or not all(
                isinstance(i, str) for i in items):
            raise ValueError("needs a list of strings")
        values = tuple(i.strip() for i in items if i.strip())
        return frozenset(values) if "frozenset" in kind else values
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError("needs true or false")
    if kind in ("int", "float"):
        value = _number(raw, kind, size=meta.get("size", False))
        lo_hi = meta.get("between")
        if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
            lo, hi = (show_size(x) if meta.get("size") else f"{x:g}" for x in lo_hi)
            raise ValueError(f"must be in {lo}..{hi}")
        return value
    if not isinstance(raw, str):
        raise ValueError("needs a string")
    raw = meta.get("aliases", {}).get(raw, raw)
    choices = meta.get("choices")
    if choices and raw not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return raw



def _number(raw: Any, kind: str, *, size: bool) -> int | float:
    if isinstance(raw, bool):
        raise ValueError("needs a number, not true/false")
    if size:
        try:
            return parse_size(raw)
        except ValueError:
            raise ValueError("needs a size such as 1048576, 64K, 4M or 1G") from None
    if kind == "int" and isinstance(raw, float):
        raise ValueError("needs an integer")
    try:
        value = int(raw) if kind == "int" else float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"needs {'an integer' if kind == 'int' else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("needs a finite number")
    return value


def load(
    file_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    source: str = "config file",
) -> Config:
    """Merge the layers into a Config and check it.

    Args:
        flags: flat key names (``readahead``, ``registry_concurrency``) to values as typed
            on the command line or already converted; None means "not given".

    Raises:
        ConfigError: unknown key, bad value or bad TOML in the file or the environment; the
            message names the key and where it came from.
        UsageError: a bad flag value (exit status 2, as for any malformed command line).
    """
    values: dict[str, Any] = {}
    if file_text is not None:
        for name, raw in _file_values(file_text, source):
            values[name] = _converted(KEYS[name], raw, f"{source}: key {KEYS[name].toml!r}")
    for var, raw in (environ or {}).items():
        key = KEYS.get(var[len(ENV_PREFIX):].lower()) if var.startswith(ENV_PREFIX) else None
        if key is not None:
            values[key.name] = _converted(key, raw, f"environment variable {key.env}")
    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = _converted(KEYS[name], raw, KEYS[name].flag, UsageError)
    top = {n: v for n, v in values.items() if KEYS[n].table is None}
    tables: dict[str, Any] = {}
    for table in TABLES:
        sub = {KEYS[n].field.name: v for n, v in values.items() if KEYS[n].table == table}
        try:
            tables[table] = type(Config.__dataclass_fields__[table].default_factory())(**sub)  # type: ignore[misc]
        except ConfigError as exc:
            raise ConfigError(f"[{table}]: {exc}") from None
    return Config(**top, **tables)


def _file_values(text: str, source: str) -> Iterator[tuple[str, Any]]:
    import tomllib  # noqa: PLC0415 - only with a config file (serve start-up)

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{source} is not valid TOML ({exc}): fix the line it names"
        raise ConfigError(msg) from None
    except ValueError:  # an integer beyond Python's int-string conversion limit
        msg = f"{source} holds a number with more digits than any setting takes: shorten it"
        raise ConfigError(msg) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        msg = f"{source} nests arrays or tables too deeply for a config file: flatten it"
        raise ConfigError(msg) from None
    for key, raw in document.items():
        name = key.replace("-", "_")
        if name in TABLES:
            if not isinstance(raw, dict):
                msg = f"{source}: '{key}' must be a table ([{name}])"
                raise ConfigError(msg)
            for sub, value in raw.items():
                flat = f"{name}_{sub.replace('-', '_')}"
                if flat not in KEYS:
                    known = ", ".join(k.field.name for k in KEYS.values() if k.table == name)
                    msg = f"{source}: unknown key {sub!r} in [{name}] (known: {known})"
                    raise ConfigError(msg)
                yield flat, value
        elif name in KEYS and KEYS[name].table is None:
            yield name, raw
        elif name in MOVED:
            msg = f"{source}: key {key!r} is now {MOVED[name]}: move it there"
            raise ConfigError(msg)
        else:
            known = ", ".join([k.name for k in KEYS.values() if k.table is None] +
                              [f"[{t}]" for t in TABLES])
            msg = f"{source}: unknown key {key!r} (known: {known})"
            raise ConfigError(msg)


def _converted(key: Key, raw: Any, where: str,
               error: type[ConfigError | UsageError] = ConfigError) -> Any:
    try:
        return convert(key, raw)
    except ValueError as exc:
        msg = f"{where}: {_shown(raw)} {exc}"
        raise error(msg) from None


def _shown(raw: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, cut short (a value may be thousands of digits)."""
    if isinstance(raw, bool | float) or (isinstance(raw, int) and abs(raw) < 10**limit):
        text = repr(raw)
    elif isinstance(raw, str):
        text = repr(raw if len(raw) <= limit else raw[:limit] + "...")
    else:
        text = repr(type(raw).__name__)
    return text if len(text) <= limit + 5 else text[:limit] + "..."
