# SPDX-License-Identifier: Apache-2.0
"""One typed configuration: every key the same in the TOML file, the environment and flags."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ondemand_d.cli import build_parser
from ondemand_d.config import KEYS, Config, load
from ondemand_d.errors import ConfigError, UsageError
from ondemand_d.registry.config import RegistryConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "config.toml.example"

# key: (TOML value, the same as environment/flag text, the typed value, a bad text).
# Every key of Config and of its [registry] table is here (test_every_key_has_a_row).
ROWS: dict[str, tuple[str, str, Any, str]] = {
    "store": ('"/srv/store"', "/srv/store", Path("/srv/store"), ""),
    "cache_dir": ('"/srv/cache"', "/srv/cache", Path("/srv/cache"), ""),
    "tag": ('"apps"', "apps", "apps", "two words"),
    "device": ('"/dev/other"', "/dev/other", Path("/dev/other"), ""),
    "concurrency": ("8", "8", 8, "0"),
    "io_threads": ("2", "2", 2, "257"),
    "prefill_bootstrap": ("false", "false", False, "maybe"),
    "prefetch": ("true", "yes", True, "2"),
    "readahead": ('"8M"', "8M", 8 << 20, "5X"),
    "write_through": ("false", "off", False, "nope"),
    "shutdown_timeout": ("2.5", "2.5", 2.5, "nan"),
    "log_format": ('"json"', "json", "json", "xml"),
    "log_level": ('"debug"', "debug", "debug", "loud"),
    "log_target": ('"stderr"', "stderr", "stderr", "syslog"),
    "native": ('"python"', "python", "python", "rust"),
    "control_socket": ('"/run/x.sock"', "/run/x.sock", Path("/run/x.sock"), None),
    "control_idle_timeout": ("5", "5", 5.0, "0"),
    "control_max_connections": ("8", "8", 8, "0"),
    "hung_read_after": ("5", "5", 5.0, "0"),
    "local_read_timeout": ("5", "5", 5.0, "0"),
    "max_chunk": ('"8M"', "8M", 8 << 20, "1K"),
    "max_bootstrap": ('"64M"', "64M", 64 << 20, "1K"),
    "max_image": ('"2G"', "2G", 2 << 30, "big"),
    "cache_max": ('"10G"', "10G", 10 << 30, "-1"),
    "images_dir": ('"/srv/erofs"', "/srv/erofs", Path("/srv/erofs"), None),
    "images_max_size": ('"2G"', "2G", 2 << 30, "1K"),
    "mount_nosuid": ("false", "false", False, "maybe"),
    "holder_grace": ("5", "5", 5.0, "-1"),
    "registry_docker_config": ('"/etc/d.json"', "/etc/d.json", Path("/etc/d.json"), None),
    "registry_ca_file": ('"/etc/ca.pem"', "/etc/ca.pem", Path("/etc/ca.pem"), None),
    "registry_insecure": ('["a:5000", "b"]', "a:5000, b", frozenset({"a:5000", "b"}), None),
    "registry_concurrency": ("16", "16", 16, "0"),
    "registry_connect_timeout": ("3", "3", 3.0, "-1"),
    "registry_read_timeout": ("4.5", "4.5", 4.5, "0"),
    "registry_request_timeout": ("60", "60", 60.0, "inf"),
    "registry_fetch_deadline": ("90", "90", 90.0, "soon"),
    "registry_retries": ("1", "1", 1, "-1"),
    "registry_backoff_base": ("0.5", "0.5", 0.5, "x"),
    "registry_backoff_max": ("9", "9", 9.0, "-3"),
    "registry_max_range": ('"1M"', "1M", 1 << 20, "1K"),
    "registry_prefetch_concurrency": ("1", "1", 1, "0"),
    "registry_prefetch_bandwidth": ('"2M"', "2M", 2 << 20, "fast"),
}


def _value(cfg: Config, name: str) -> Any:
    key = KEYS[name]
    return getattr(getattr(cfg, key.table), key.field.name) if key.table else getattr(cfg, name)


def _toml(name: str, literal: str) -> str:
    key = KEYS[name]
    return f"[{key.table}]\n{key.field.name} = {literal}\n" if key.table else \
        f"{name} = {literal}\n"


def test_every_key_has_a_row() -> None:
    assert set(ROWS) == set(KEYS)


def test_defaults() -> None:
    cfg = load()
    assert cfg == Config()
    assert cfg.registry == RegistryConfig()
    assert cfg.readahead == 4 << 20


@pytest.mark.parametrize("name", sorted(ROWS))
def test_key_means_the_same_in_file_environment_and_flags(name: str) -> None:
    """Each key, written in each of the three places, gives the same typed value."""
    literal, text, want, _ = ROWS[name]
    key = KEYS[name]
    assert _value(load(_toml(name, literal)), name) == want
    assert _value(load(None, {key.env: text}), name) == want
    assert _value(load(None, {}, {name: text}), name) == want
    if key.meta.get("flag"):
        args = build_parser("serve").parse_args(["serve", key.flag, text]
                                                if str(key.field.type) != "bool" else
                                                ["serve", key.flag if want else
                                                 "--no-" + key.flag[2:]])
        assert _value(load(None, {}, {name: getattr(args, name)}), name) == want


@pytest.mark.parametrize("name", sorted(n for n, row in ROWS.items() if row[3] is not None))
def test_bad_value_names_the_key_and_the_place(name: str) -> None:
    """A bad value is refused in every place with a sentence naming the key."""
    bad = ROWS[name][3]
    key = KEYS[name]
    with pytest.raises(ConfigError, match=re.escape(key.toml if key.table else repr(name))):
        load(_toml(name, f'"{bad}"'))
    with pytest.raises(ConfigError, match=key.env):
        load(None, {key.env: bad})
    with pytest.raises(UsageError, match=key.flag):
        load(None, {}, {name: bad})


def test_precedence_file_env_flags() -> None:
    text = 'store = "/srv/store"\ntag = "filetag"\nconcurrency = 8\nprefetch = true\n'
    env = {"ONDEMAND_D_TAG": "envtag", "ONDEMAND_D_CONCURRENCY": "16", "HOME": "/root"}
    cfg = load(text, env, {"concurrency": 32, "tag": None})
    assert cfg.store == Path("/srv/store")
    assert cfg.tag == "envtag"
    assert cfg.concurrency == 32
    assert cfg.prefetch is True


def test_sizes_in_toml_and_environment() -> None:
    """Sizes such as 4M work in the file and the environment, as they do as flags."""
    assert load('readahead = "4M"').readahead == 4 << 20
    assert load("readahead = 65536").readahead == 65536
    assert load(None, {"ONDEMAND_D_READAHEAD": "64K"}).readahead == 64 << 10
    assert load(None, {"ONDEMAND_D_READAHEAD": "1MiB"}).readahead == 1 << 20
    with pytest.raises(ConfigError, match="1G"):
        load('readahead = "2G"')


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bogus = 1", "unknown key 'bogus'"),
        ("concurrency = 'many'", "'concurrency'"),
        ("concurrency = 4.5", "needs an integer"),
        ("store = [", "not valid TOML"),
        ("registry = 3", r"must be a table \(\[registry\]\)"),
        ("[registry]\ncolour = 'blue'", r"unknown key 'colour' in \[registry\]"),
        ("[registry]\nconcurrency = 2\nprefetch_concurrency = 3", "prefetch_concurrency"),
        ("ca_file = '/x.pem'", r"now \[registry\] ca_file"),
        ("insecure_registries = ['a']", r"now \[registry\] insecure"),
        ("cache_dir = 'relative/dir'", "'cache_dir'"),
    ],
)
def test_file_errors_name_the_key(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(text, {}, {})


def test_registry_table_reaches_the_daemons_source() -> None:
    """serve's registry settings come from [registry] (make_source reads cfg.registry)."""
    from ondemand_d.registry.source import make_source

    cfg = load('[registry]\nconcurrency = 3\nmax_range = "2M"\n',
               {"ONDEMAND_D_REGISTRY_RETRIES": "7"}, {"registry_prefetch_bandwidth": "1M"})
    got = make_source(cfg).config
    assert (got.concurrency, got.max_range, got.retries, got.prefetch_bandwidth) == \
        (3, 2 << 20, 7, 1 << 20)


def test_unrelated_environment_is_ignored() -> None:
    """ONDEMAND_D_* variables that are no key (the guest's, the kernel cache's) are not errors."""
    cfg = load(None, {"ONDEMAND_D_IN_GUEST": "1", "ONDEMAND_D_KERNEL_CACHE": "/x", "PATH": "/b"})
    assert cfg == Config()


def test_control_socket_off() -> None:
    """An empty control_socket turns the socket off in every place."""
    assert load('control_socket = ""').control_socket is None
    assert load(None, {"ONDEMAND_D_CONTROL_SOCKET": ""}).control_socket is None


def test_native_old_environment_spelling() -> None:
    """ONDEMAND_D_NATIVE=0/1 (as _native documents it) still means python/cffi."""
    assert load(None, {"ONDEMAND_D_NATIVE": "0"}).native == "python"
    assert load(None, {"ONDEMAND_D_NATIVE": "1"}).native == "cffi"


def test_example_documents_every_key_and_loads() -> None:
    """systemd/config.toml.example names every key, and loads once uncommented."""
    text = EXAMPLE.read_text()
    table = None
    found = set()
    for line in text.splitlines():
        bare = line.lstrip("# ").strip()
        if m := re.fullmatch(r"\[(\w+)\]", bare):
            table = m[1]
        elif m := re.match(r"(\w+) = ", bare):
            found.add(f"{table}_{m[1]}" if table else m[1])
    assert found == set(KEYS)
    uncommented = "\n".join(re.sub(r"^# (\w+ = |\[)", r"\1", line)
                            for line in text.splitlines())
    cfg = load(uncommented)
    assert cfg.registry.ca_file is not None
    assert load(text).readahead == 4 << 20
