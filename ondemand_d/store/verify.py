# SPDX-License-Identifier: Apache-2.0
"""Checking chunk bytes against their digest: the one place that decides 'verified'."""
from __future__ import annotations

import hashlib

from ondemand_d.errors import DigestMismatch
from ondemand_d.store.model import Chunk


def verified(chunk: Chunk, data: bytes | bytearray | memoryview) -> bytes:
    """Return `data` as bytes if it is exactly the chunk's content.

    Raises:
        DigestMismatch: wrong length or wrong sha256.
    """
    check(chunk, data)
    return bytes(data)


def check(chunk: Chunk, data: bytes | bytearray | memoryview) -> None:
    """Raise DigestMismatch unless `data` is exactly the chunk's content (no copy made)."""
    if len(data) != chunk.length:
        msg = f"chunk {chunk.digest}: {len(data)} bytes, expected {chunk.length}"
        raise DigestMismatch(msg)
    got = hashlib.sha256(data).hexdigest()
    if got != chunk.digest:
        msg = f"chunk {chunk.digest}: content hashes to {got}"
        raise DigestMismatch(msg)
