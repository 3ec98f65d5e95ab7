# SPDX-License-Identifier: Apache-2.0
"""Header helpers: Retry-After, Content-Range, error descriptions without URLs."""

from __future__ import annotations

import email.utils
import time

import aiohttp

from ondemand_d.registry._http import (
    RETRY_AFTER_CAP,
    content_range_start,
    describe,
    retry_after,
)


def test_retry_after_forms() -> None:
    """Seconds, an HTTP date, garbage and huge values."""
    assert retry_after("2") == 2.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("100000") == RETRY_AFTER_CAP
    assert retry_after("-5") == 0.0
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    got = retry_after(date)
    assert got is not None and 3 <= got <= 6


def test_content_range_start() -> None:
    """Only 'bytes a-b/n' yields a start."""
    assert content_range_start("bytes 100-199/1000") == 100
    assert content_range_start("bytes */1000") is None
    assert content_range_start("items 1-2/3") is None
    assert content_range_start("") is None


def test_describe_has_no_url() -> None:
    """Error reasons name the failure, never the URL (signed URLs carry secrets)."""
    exc = aiohttp.ClientPayloadError("Response payload is not completed http://x/?sig=SECRET")
    assert describe(exc) == "truncated or malformed body"
    assert describe(TimeoutError()) == "timed out"
    assert "SECRET" not in describe(aiohttp.ClientError("http://x/?sig=SECRET"))
