# SPDX-License-Identifier: Apache-2.0
"""Extended attributes as EROFS inline xattr bodies, and the fingerprint prefix.

Only the namespaces EROFS has short prefixes for are kept (spec §8.1): user.,
trusted., security. and the two POSIX ACL names. Anything else (e.g. a stray
"system.foo") cannot be stored without a hidden long prefix, so it is dropped
and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ondemand_d.image.format import (
    XATTR_INDEX_POSIX_ACL_ACCESS,
    XATTR_INDEX_POSIX_ACL_DEFAULT,
    XATTR_INDEX_SECURITY,
    XATTR_INDEX_TRUSTED,
    XATTR_INDEX_USER,
    XATTR_LONG_PREFIX,
    long_prefix,
    xattr_entry,
    xattr_header,
)

_EXACT = {
    b"system.posix_acl_access": XATTR_INDEX_POSIX_ACL_ACCESS,
    b"system.posix_acl_default": XATTR_INDEX_POSIX_ACL_DEFAULT,
}
_PREFIXES = (
    (b"user.", XATTR_INDEX_USER),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)

#: erofs-utils' default fingerprint name (spec §8.5): no short prefix, hidden
#: from userspace.
DEFAULT_FINGERPRINT_NAME = b"erofs.fingerprint.v1"


def split_name(name: bytes) -> tuple[int, bytes] | None:
    """Map a full xattr name to (e_name_index, suffix), or None if EROFS can't hold it."""
    if name in _EXACT:
        return _EXACT[name], b""
    for prefix, index in _PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    return None


@dataclass(frozen=True, slots=True)
class FingerprintPrefix:
    """The long prefix a fingerprint xattr is named by (spec §8.4, §8.5)."""

    name: bytes = DEFAULT_FINGERPRINT_NAME

    @property
    def base_and_infix(self) -> tuple[int, bytes]:
        split = split_name(self.name)
        # A name with no short prefix keeps base_index 0: the kernel hides it.
        return (0, self.name) if split is None or split[0] not in (1, 4, 6) else split

    def record(self) -> bytes:
        return long_prefix(*self.base_and_infix)

    @staticmethod
    def value(sha256: bytes) -> bytes:
        """Spec §8.5: b"sha256:" + the raw 32-byte digest of the file's bytes."""
        return b"sha256:" + sha256


def inline_body(
    xattrs: dict[bytes, bytes], fingerprint: bytes | None = None, prefix_id: int = 0
) -> tuple[bytes, int]:
    """Encode an inode's inline xattr body; return (body, names dropped).

    Entries are sorted by (index, suffix) so the same xattrs always give the
    same bytes. `fingerprint` adds the ishare entry (name index 0x80|prefix_id,
    empty suffix).
    """
    entries: list[tuple[int, bytes, bytes]] = []
    dropped = 0
    for name, value in xattrs.items():
        split = split_name(name)
        if split is None:
            dropped += 1
            continue
        entries.append((split[0], split[1], value))
    if fingerprint is not None:
        entries.append((XATTR_LONG_PREFIX | prefix_id, b"", fingerprint))
    if not entries:
        return b"", dropped
    body = xattr_header() + b"".join(xattr_entry(i, n, v) for i, n, v in sorted(entries))
    return body, dropped
