# SPDX-License-Identifier: Apache-2.0
"""The exception tree. OndemandError is the root and is never raised itself.

Each class carries the exit status the command line gives it (README, "Exit codes"):
1 failed, 2 usage, 3 configuration, 4 device. A message is one sentence: what is wrong and
what to do about it.
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG, EXIT_DEVICE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class OndemandError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = EXIT_FAILED


class UsageError(OndemandError, ValueError):
    """The command line is wrong: a missing or malformed argument or flag value."""

    exit_code = EXIT_USAGE


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
    """A setting (config file, environment, or what it names, e.g. the store) is wrong."""

    exit_code = EXIT_CONFIG


class DeviceError(OndemandError):
    """/dev/cachefiles could not be set up; the message says what to do about it."""

    exit_code = EXIT_DEVICE


class CacheDirError(DeviceError):
    """The cache directory setting cannot work (tmpfs, cannot be created): configuration."""

    exit_code = EXIT_CONFIG


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


class MountError(OndemandError):
    """A mount or umount request that cannot be carried out (the message says why)."""
