# SPDX-License-Identifier: Apache-2.0
"""One configuration key: :func:`setting` declares it, :func:`parse_size` reads sizes.

A key is a dataclass field with metadata; :mod:`ondemand_d.config` turns every such field of
Config and of its tables (RegistryConfig) into a TOML key, an ONDEMAND_D_* variable and a flag.
This module imports nothing of the package, so every settings dataclass can use it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, size: bool = False,
            choices: tuple[str, ...] = (), between: tuple[float, float] | None = None,
            flag: bool | str = True, check: Callable[[Any], str | None] | None = None,
            aliases: Mapping[str, str] | None = None,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A configuration key: a dataclass field whose metadata says how to parse and check it.

    Args:
        doc: one line for ``--help`` and the example config.
        size: also accept ``64K``, ``4M``, ``1G`` (an int key).
        choices: the allowed strings.
        between: inclusive bounds of a number.
        flag: whether ``serve`` gets a flag for it (a string: the flag's spelling, when it is
            not ``--`` and the key's name with dashes).
        check: called with the typed value; returns what is wrong with it, or None.
        aliases: other spellings of a string value (e.g. ``{"0": "python"}``).
    """
    meta = {"doc": doc, "size": size, "choices": choices, "between": between, "flag": flag,
            "check": check, "aliases": aliases or {}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_size(text: str | int) -> int:
    """``1048576``, ``64K``, ``4M``, ``1G``, ``1MiB`` -> bytes (ValueError otherwise)."""
    if isinstance(text, bool):
        raise ValueError(text)
    if isinstance(text, int):
        if text < 0:
            raise ValueError(text)
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(text)
    return int(match[1]) * _UNITS[match[2].lower()]


def show_size(value: float) -> str:
    """The shortest exact spelling: 4194304 -> 4M, 1000 -> 1000."""
    for unit in "TGMK":
        scale = _UNITS[unit.lower()]
        if value >= scale and not value % scale:
            return f"{int(value) // scale}{unit}"
    return f"{value:g}"
