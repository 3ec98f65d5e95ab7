# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pathlib import Path

import pytest

from ondemand_d.config import Config, load
from ondemand_d.errors import ConfigError


def test_defaults():
    assert load() == Config()


def test_precedence_file_env_flags():
    text = 'store = "/srv/store"\ntag = "filetag"\nconcurrency = 8\nprefetch = true\n'
    env = {"ONDEMAND_D_TAG": "envtag", "ONDEMAND_D_CONCURRENCY": "16", "HOME": "/root"}
    cfg = load(text, env, {"concurrency": 32, "tag": None})
    assert cfg.store == Path("/srv/store")
    assert cfg.tag == "envtag"
    assert cfg.concurrency == 32
    assert cfg.prefetch is True


@pytest.mark.parametrize(
    ("text", "flags", "match"),
    [
        ("bogus = 1", {}, "unknown key 'bogus'"),
        ("concurrency = 'many'", {}, "'concurrency'"),
        ("", {"concurrency": 0}, "'concurrency'"),
        ("", {"log_format": "xml"}, "'log_format'"),
        ("", {"tag": "has space"}, "'tag'"),
        ("", {"cache_dir": "relative/dir"}, "'cache_dir'"),
        ("store = [", {}, "config file"),
        ("prefetch = 'maybe'", {}, "'prefetch'"),
    ],
)
def test_errors_name_the_key(text, flags, match):
    with pytest.raises(ConfigError, match=match):
        load(text, {}, flags)


def test_insecure_registries_from_env():
    cfg = load(None, {"ONDEMAND_D_INSECURE_REGISTRIES": "a:5000, b"}, {})
    assert cfg.insecure_registries == ("a:5000", "b")
