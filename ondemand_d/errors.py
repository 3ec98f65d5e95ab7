# SPDX-License-Identifier: Apache-2.0
"""The exception tree. OndemandError is the root and is never raised itself."""
from __future__ import annotations


class OndemandError(Exception):
    """Root of every error this package raises on purpose."""


class ProtocolError(OndemandError, ValueError):
    """The kernel sent bytes that do not form a valid cachefiles message."""

    def __init__(
        self, reason: str, msg_id: int | None = None, *, opcode: int | None = None,
        fd: int | None = None,
    ) -> None:
        super().__init__(reason if msg_id is None else f"msg_id {msg_id}: {reason}")
        self.reason = reason
        self.msg_id = msg_id  # set when the header was readable: the request can be answered
        self.opcode = opcode
        self.fd = fd  # an OPEN's anon fd, installed by the kernel even if the keys are bad


class ConfigError(OndemandError, ValueError):
    """A configuration value is missing or wrong; the message names the key."""


class DeviceError(OndemandError):
    """/dev/cachefiles could not be set up; the message says what to do about it."""


class StoreError(OndemandError):
    """The content-addressed store cannot give what was asked for."""


class BadKey(StoreError):
    """A cookie key that is not acceptable as a lookup key (traversal, NUL, too long)."""


class UnknownName(StoreError):
    """No blob is registered under a cookie key or image name."""


class ChunkNotFound(StoreError):
    """A chunk named by a blob's chunk table is not in the store."""


class DigestMismatch(StoreError):
    """A chunk's bytes do not hash to the digest its chunk table names."""


class FetchError(StoreError):
    """A remote source failed to deliver a chunk."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ImageError(OndemandError):
    """An image or its source cannot be read or built."""
