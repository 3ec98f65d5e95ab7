# SPDX-License-Identifier: Apache-2.0
"""Stack OCI layer tarballs (tar, tar+gzip, tar+zstd) into one tree.

Layers apply in order with the OCI whiteout rules: `.wh.NAME` deletes NAME
from the layers below and `.wh..wh..opq` empties a directory of what the
layers below put there. Member data is copied once into a spool file, since a
compressed stream cannot be read at random and the builder reads big files
twice. Nothing is extracted to disk, so no member can escape anything; still,
a member path that is absolute, holds "..", or runs through a symlink is
refused, because it would mean something else to every other tool.
"""
from __future__ import annotations

import errno
import gzip
import math
import os
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import IO, cast

import zstandard

from ondemand_d.errors import ImageError
from ondemand_d.image.tree import Node, SpooledContent, check_name, directory

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_COPY = 1 << 20
_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.CONTTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO,
}


def open_layer(f: IO[bytes]) -> IO[bytes]:
    """Return a stream of the tar bytes, undoing gzip or zstd found by magic number."""
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return cast("IO[bytes]", gzip.GzipFile(fileobj=f, mode="rb"))
    if magic == b"\x28\xb5\x2f\xfd":
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return cast("IO[bytes]", reader)
    return f


class LayerStack:
    """A tree built by applying layers; holds the spool file until closed."""

    def __init__(self, spool_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = directory()
        self._spool_dir = spool_dir or tempfile.gettempdir()
        self._spool = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 - closed in close()
        self._end = 0
        self._label = ""
        self._fresh: set[tuple[int, bytes]] = set()

    def __enter__(self) -> LayerStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()

    def apply(self, path: str | os.PathLike[str], label: str | None = None) -> None:
        """Apply one layer tarball on top of what is there.

        Raises:
            ImageError: the archive is truncated or corrupt, or a member is unsafe.
        """
        self._label = label or str(path)
        self._fresh = set()  # (id(dir), name) added by this layer: whiteouts spare them
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            msg = f"cannot read layer {self._label}: {exc.strerror}"
            raise ImageError(msg) from exc
        try:
            with raw, open_layer(raw) as stream, tarfile.open(
                fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tar:
                for member in tar:
                    self._member(tar, member)
                # tar stops at its end marker; the gzip trailer (CRC-32, length) and a zstd
                # frame's checksum are only checked once the stream is read to its end.
                while stream is not raw and stream.read(1 << 20):
                    pass
        except ImageError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                msg = f"no space left to unpack layer {self._label} into {self._spool_dir}"
                raise ImageError(msg) from exc
            msg = f"layer {self._label} is truncated or corrupt: {exc}"
            raise ImageError(msg) from exc
        except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            msg = f"layer {self._label} is truncated or corrupt: {exc}"
            raise ImageError(msg) from exc

    # -- one member ------------------------------------------------------------

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self._parts(m.name, m.name)
        if not parts:  # "./": the root itself
            if m.isdir():
                self._set_meta(self.root, m)
            return
        *parents, base = parts
        if base == OPAQUE:
            parent = self._make_dir(parents, m.name)
            for name in list(parent.children):
                if (id(parent), name) not in self._fresh:
                    del parent.children[name]
            return
        if base.startswith(WHITEOUT):
            gone = base[len(WHITEOUT) :]
            holder = self._dir(parents, m.name, create=False)
            if holder is not None and (id(holder), gone) not in self._fresh:
                holder.children.pop(gone, None)
            return
        parent = self._make_dir(parents, m.name)
        existing = parent.children.get(base)
        if m.islnk():
            node = self._link_target(m)
        elif m.isdir() and existing is not None and existing.is_dir:
            self._set_meta(existing, m)  # a directory in two layers merges
            node = existing
        else:
            node = self._node(tar, m)
        parent.children[base] = node
        self._fresh.add((id(parent), base))

    def _node(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> Node:
        fmt = _TYPES.get(m.type)
        if fmt is None:
            msg = f"layer {self._label}: member {m.name!r} has unsupported tar type {m.type!r}"
            raise ImageError(msg)
        node = Node(fmt)
        self._set_meta(node, m)
        if fmt == stat.S_IFREG:
            node.content = self._spool_member(tar, m)
        elif fmt == stat.S_IFLNK:
            node.target = m.linkname.encode("utf-8", "surrogateescape")
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = (m.devmajor, m.devminor)
        return node

    def _set_meta(self, node: Node, m: tarfile.TarInfo) -> None:
        node.mode, node.uid, node.gid = m.mode & 0o7777, m.uid, m.gid
        node.mtime_ns = _mtime_ns(m)
        node.xattrs = {
            k[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape"): v.encode(
                "utf-8", "surrogateescape"
            )
            for k, v in m.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }

    def _spool_member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> SpooledContent:
        src = tar.extractfile(m)
        assert src is not None
        base = self._end
        copied = 0
        while block := src.read(_COPY):
            os.pwrite(self._spool.fileno(), block, base + copied)
            copied += len(block)
        if copied != m.size:
            msg = f"layer {self._label}: member {m.name!r} is truncated ({copied} of {m.size} B)"
            raise ImageError(msg)
        self._end += copied
        return SpooledContent(self._spool.fileno(), base, copied, f"{self._label}:{m.name}")

    def _link_target(self, m: tarfile.TarInfo) -> Node:
        *parents, base = self._parts(m.linkname, m.name) or [b""]
        parent = self._dir(parents, m.name, create=False)
        target = parent.children.get(base) if parent is not None else None
        if target is None or target.is_dir:
            link = f"{m.name!r} -> {m.linkname!r}"
            msg = f"layer {self._label}: hard link {link} has no file to point at"
            raise ImageError(msg)
        return target

    # -- paths ---------------------------------------------------------------

    def _parts(self, name: str, member: str) -> list[bytes]:
        raw = name.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            msg = f"layer {self._label}: member {member!r} has a NUL in its path"
            raise ImageError(msg)
        if raw.startswith(b"/"):
            msg = f"layer {self._label}: member {member!r} has an absolute path {name!r}"
            raise ImageError(msg)
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            msg = f"layer {self._label}: member {member!r} escapes the root through '..'"
            raise ImageError(msg)
        for p in parts:
            check_name(p, f" in layer {self._label}, member {member!r}")
        return parts

    def _make_dir(self, parts: list[bytes], member: str) -> Node:
        """The directory at `parts`, created (with its parents) if missing."""
        found = self._dir(parts, member, create=True)
        assert found is not None  # create=True never gives None
        return found

    def _dir(self, parts: list[bytes], member: str, *, create: bool) -> Node | None:
        """The directory at `parts`, never following a symlink."""
        cur = self.root
        for i, part in enumerate(parts):
            child = cur.children.get(part)
            where = b"/".join(parts[: i + 1]).decode(errors="replace")
            if child is None:
                if not create:
                    return None
                child = directory()  # implied by a deeper member, as tar(1) does
                cur.children[part] = child
                self._fresh.add((id(cur), part))
            elif child.fmt == stat.S_IFLNK:
                msg = f"layer {self._label}: member {member!r} goes through symlink {where!r}"
                raise ImageError(msg)
            elif not child.is_dir:
                msg = f"layer {self._label}: member {member!r} needs {where!r} to be a directory"
                raise ImageError(msg)
            cur = child
        return cur


def _mtime_ns(m: tarfile.TarInfo) -> int:
    """Exact nanoseconds from a PAX mtime string when there is one (floats lose digits).

    Raises:
        ImageError: the mtime is not a number (NaN, inf); out-of-range ones are clamped later.
    """
    text = m.pax_headers.get("mtime")
    if text:
        sec, _, frac = text.strip().partition(".")
        try:
            whole = int(sec)
            nsec = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            pass
        else:  # "-1.5" is -1 s - 0.5 s
            return whole * 1_000_000_000 + (-nsec if sec.startswith("-") else nsec)
    if not math.isfinite(m.mtime):
        msg = f"tar member {m.name}: mtime {text or m.mtime!r} is not a time: fix the archive"
        raise ImageError(msg)
    return int(m.mtime) * 1_000_000_000


def read_layers(paths: list[Path], spool_dir: str | os.PathLike[str] | None = None) -> LayerStack:
    """Apply `paths` in order; the caller closes the returned stack after the build."""
    stack = LayerStack(spool_dir)
    try:
        for p in paths:
            stack.apply(p)
    except BaseException:
        stack.close()
        raise
    return stack
