# SPDX-License-Identifier: Apache-2.0
"""The in-memory source tree every source (directory, layer tarballs, OCI) produces.

A `Node` is an inode: hard links are one Node object reached through several
directory entries, so identity (`is`) is link identity. File bytes stay where
they are; a `Content` reads them on demand, so a tree of any size costs only
its metadata in memory.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from ondemand_d.errors import ImageError
from ondemand_d.image.format import MAX_NAME
from ondemand_d.image.xattrs import split_name

#: Linux refuses longer symlink targets (PATH_MAX - 1).
MAX_SYMLINK = 4095
#: (uid_t)-1 is no id: the kernel would show it as the overflow id 65534.
MAX_ID = 2**32 - 1
#: An extended inode's i_mtime is a u64 of seconds plus a u32 of nanoseconds.
MAX_MTIME_NS = (2**64 - 1) * 1_000_000_000 + 999_999_999
#: erofs_xattr_entry: e_name_len is a u8, e_value_size a u16 (spec §8.1).
MAX_XATTR_SUFFIX = 255
MAX_XATTR_VALUE = 0xFFFF

log = structlog.get_logger()


class Content(Protocol):
    """A regular file's bytes, read by range."""

    @property
    def size(self) -> int:
        """The file's length in bytes."""

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`; raise ImageError if they cannot be read."""

    def has_data(self, offset: int, length: int) -> bool:
        """False only if [offset, offset+length) is known to be a hole."""


@dataclass(frozen=True, slots=True)
class BytesContent:
    """File bytes held in memory (tests, tiny synthetic files)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def has_data(self, offset: int, length: int) -> bool:  # noqa: ARG002 - no holes here
        return True


@dataclass(frozen=True, slots=True)
class FileContent:
    """Bytes of a file on disk; holes are found with SEEK_DATA."""

    path: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"cannot read {self.path}: {exc.strerror}; fix its permissions or leave it out"
            raise ImageError(msg) from exc
        try:
            data = _pread_exact(fd, offset, length, self.path)
        finally:
            os.close(fd)
        return data

    def has_data(self, offset: int, length: int) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return True  # read() reports the error with context
        try:
            return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
        except OSError:
            return False  # ENXIO: no data at or after offset
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class SpooledContent:
    """A range of a spool file (tar member data copied out of a compressed stream)."""

    fd: int
    base: int
    size: int
    label: str

    def read(self, offset: int, length: int) -> bytes:
        return _pread_exact(self.fd, self.base + offset, length, self.label)

    def has_data(self, offset: int, length: int) -> bool:  # noqa: ARG002 - zeros found later
        return True


def _pread_exact(fd: int, offset: int, length: int, label: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < length:
        try:
            part = os.pread(fd, length - got, offset + got)
        except OSError as exc:
            msg = f"cannot read {label}: {exc.strerror}"
            raise ImageError(msg) from exc
        if not part:
            msg = f"{label} ended at {offset + got} bytes; it changed while the image was built"
            raise ImageError(msg)
        parts.append(part)
        got += len(part)
    return b"".join(parts)


@dataclass(eq=False, slots=True)
class Node:
    """One inode of the tree. `fmt` is the S_IFMT type, `mode` the permission bits."""

    fmt: int
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    content: Content | None = None  # S_IFREG
    target: bytes = b""  # S_IFLNK
    rdev: tuple[int, int] = (0, 0)  # S_IFCHR / S_IFBLK: (major, minor)
    children: dict[bytes, Node] = field(default_factory=dict)  # S_IFDIR

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR

    @property
    def size(self) -> int:
        if self.fmt == stat.S_IFREG:
            return self.content.size if self.content is not None else 0
        if self.fmt == stat.S_IFLNK:
            return len(self.target)
        return 0

    @property
    def mtime(self) -> tuple[int, int]:
        return divmod(self.mtime_ns, 1_000_000_000)


def directory(mode: int = 0o755, **kw: object) -> Node:
    return Node(stat.S_IFDIR, mode, **kw)  # type: ignore[arg-type]


def regular(data: bytes | Content, mode: int = 0o644, **kw: object) -> Node:
    content = BytesContent(data) if isinstance(data, bytes) else data
    return Node(stat.S_IFREG, mode, content=content, **kw)  # type: ignore[arg-type]


def symlink(target: bytes, **kw: object) -> Node:
    return Node(stat.S_IFLNK, 0o777, target=target, **kw)  # type: ignore[arg-type]


def check_name(name: bytes, where: str = "") -> bytes:
    """Refuse a directory entry name EROFS or the VFS cannot hold.

    Raises:
        ImageError: empty, ".", "..", over 255 bytes, or containing '/' or NUL.
    """
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        msg = f"bad file name {name!r}{where}: a name is not empty, '.' or '..', has no '/' or NUL"
        raise ImageError(msg)
    if len(name) > MAX_NAME:
        msg = f"file name of {len(name)} bytes{where}: EROFS allows at most {MAX_NAME}"
        raise ImageError(msg)
    return name


def check_node(node: Node, where: str) -> None:
    """Refuse node contents no EROFS image can hold."""
    if node.fmt == stat.S_IFLNK and not 0 < len(node.target) <= MAX_SYMLINK:
        msg = f"symlink {where} has a target of {len(node.target)} bytes (allowed 1..{MAX_SYMLINK})"
        raise ImageError(msg)
    if node.fmt == stat.S_IFLNK and b"\0" in node.target:
        msg = f"symlink {where} has a NUL in its target"
        raise ImageError(msg)
    if not (0 <= node.uid < MAX_ID and 0 <= node.gid < MAX_ID):
        msg = f"{where} has uid/gid {node.uid}/{node.gid}; Linux ids are 0..{MAX_ID - 1}"
        raise ImageError(msg)
    if node.fmt not in _FORMATS:
        msg = f"{where} has unsupported file type {node.fmt:#o}"
        raise ImageError(msg)
    for name, value in node.xattrs.items():
        split = split_name(name)
        if split is not None and len(split[1]) > MAX_XATTR_SUFFIX:
            msg = (f"xattr {name[:40]!r}... of {where} has a {len(name)}-byte name; EROFS holds "
                   f"{MAX_XATTR_SUFFIX} bytes after the prefix: remove it from the source")
            raise ImageError(msg)
        if len(value) > MAX_XATTR_VALUE:
            msg = (f"xattr {name.decode(errors='replace')} of {where} has a {len(value)}-byte "
                   f"value; EROFS holds at most {MAX_XATTR_VALUE}: remove it from the source")
            raise ImageError(msg)


def clamp_mtime(node: Node, where: str) -> None:
    """Bring an mtime EROFS cannot hold (before 1970, past 2^64 s) to the nearest it can."""
    clamped = min(max(node.mtime_ns, 0), MAX_MTIME_NS)
    if clamped != node.mtime_ns:
        log.warning("mtime_clamped", entry=where, mtime_ns=node.mtime_ns, to_ns=clamped,
                    reason="EROFS keeps unsigned 64-bit seconds")
        node.mtime_ns = clamped


_FORMATS = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
     stat.S_IFSOCK}
)


def walk(root: Node) -> Iterator[tuple[bytes, Node]]:
    """Yield (path, node) for every directory entry, depth-first, names sorted bytewise.

    A hard-linked node is yielded once per entry; the root is yielded as b"/".
    """
    yield b"/", root
    stack: list[tuple[bytes, Node]] = [(b"", root)]
    while stack:
        prefix, node = stack.pop()
        entries = sorted(node.children.items())
        for name, child in entries:
            yield prefix + b"/" + name, child
        for name, child in reversed(entries):
            if child.is_dir:
                stack.append((prefix + b"/" + name, child))


def validate(root: Node) -> None:
    """Check every name and node of a tree before anything is written."""
    if not root.is_dir:
        msg = "the root of an image must be a directory"
        raise ImageError(msg)
    check_node(root, "/")
    clamp_mtime(root, "/")
    seen_dirs = {id(root)}
    pending: list[tuple[bytes, Node]] = [(b"", root)]
    while pending:
        prefix, node = pending.pop()
        for name, child in node.children.items():
            where = prefix.decode(errors="replace") or "/"
            check_name(name, f" in {where}")
            path = prefix + b"/" + name
            check_node(child, path.decode(errors="replace"))
            clamp_mtime(child, path.decode(errors="replace"))
            if child.is_dir:
                if id(child) in seen_dirs:
                    msg = f"directory {path.decode(errors='replace')} is linked twice"
                    raise ImageError(msg)
                seen_dirs.add(id(child))
                pending.append((path, child))
