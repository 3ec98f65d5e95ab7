# SPDX-License-Identifier: Apache-2.0
"""Reference parsing: REGISTRY/REPO:TAG and @sha256 digests."""

from __future__ import annotations

import pytest

from ondemand_d.errors import ConfigError
from ondemand_d.registry.reference import Reference, is_loopback, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:5000/app:v1", Reference("127.0.0.1:5000", "app", "v1")),
        ("reg.example/a/b/c", Reference("reg.example", "a/b/c", "latest")),
        (f"localhost:5000/a@{DIGEST}", Reference("localhost:5000", "a", None, DIGEST)),
        (f"reg.example/a:v2@{DIGEST}", Reference("reg.example", "a", "v2", DIGEST)),
        ("[::1]:5000/x.y_z-w:1.0-rc", Reference("[::1]:5000", "x.y_z-w", "1.0-rc")),
    ],
)
def test_parse(text: str, want: Reference) -> None:
    """Valid references parse to their parts; str() gives the text back."""
    got = parse(text)
    assert got == want
    assert parse(str(got)) == got


@pytest.mark.parametrize(
    "text",
    [
        "app:v1",
        "reg/App:v1",
        "reg/a:b:c",
        "reg/a@sha256:xyz",
        "reg/a:-bad",
        "reg//a",
        "/a:v1",
        "reg/a b",
    ],
)
def test_parse_rejects(text: str) -> None:
    """Malformed references are a ConfigError that quotes the input."""
    with pytest.raises(ConfigError, match="reference"):
        parse(text)


def test_ref_host_and_loopback() -> None:
    """ref prefers the digest; host strips port and brackets; loopback is 127/8, ::1, localhost."""
    r = parse(f"[::1]:5000/a:v1@{DIGEST}")
    assert r.ref == DIGEST and r.host == "::1"
    assert parse("reg.example:443/a").host == "reg.example"
    assert is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("reg.example")
