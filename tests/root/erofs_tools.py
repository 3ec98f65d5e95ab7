# SPDX-License-Identifier: Apache-2.0
"""Test helpers for built images: fsck, native loop mounts, and tree snapshots to compare."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from ondemand_d.image.materialize import ImageFiles, materialize
from ondemand_d.image.reader import ImageReader
from ondemand_d.image.tree import Node, directory, regular, symlink
from ondemand_d.store import LocalStore

XATTR_PREFIXES = ("user.", "trusted.", "security.")
Entry = tuple[object, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything the issue says must survive a build, per path, plus hard-link groups."""

    entries: dict[str, Entry]
    links: frozenset[frozenset[str]]


def fsck(files: ImageFiles, *extra: str) -> subprocess.CompletedProcess[str]:
    """fsck.erofs 1.5 with one --device= per data blob, in slot order."""
    return subprocess.run(
        ["fsck.erofs", *extra, *files.fsck_args()], capture_output=True, text=True, check=False
    )


@contextlib.contextmanager
def mounted(store: LocalStore, name: str, workdir: Path) -> Iterator[Path]:
    """Mount image `name` natively: bootstrap and each blob on a read-only loop device."""
    files = materialize(store, name, workdir / "blobs")
    target = workdir / f"mnt-{name}"
    target.mkdir(exist_ok=True)
    loops: list[str] = []
    try:
        for path in (files.bootstrap, *files.devices):
            out = subprocess.run(
                ["losetup", "-f", "--show", "-r", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            loops.append(out.stdout.strip())
        opts = ",".join(["ro", *(f"device={d}" for d in loops[1:])])
        subprocess.run(
            ["mount", "-t", "erofs", "-o", opts, loops[0], str(target)],
            capture_output=True,
            text=True,
            check=True,
        )
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def snapshot_dir(top: Path) -> Snapshot:
    """Snapshot a directory tree on disk (the source, or a mounted image)."""
    entries: dict[str, Entry] = {"/": _entry_from_stat(str(top), os.lstat(top))}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(path, top)
            st = os.lstat(path)
            entries[rel] = _entry_from_stat(path, st)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, set()).add(rel)
    return Snapshot(entries, frozenset(frozenset(v) for v in inodes.values() if len(v) > 1))


def _entry_from_stat(path: str, st: os.stat_result) -> Entry:
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        with open(path, "rb") as f:
            detail: object = hashlib.sha256(f.read()).hexdigest()
    elif fmt == stat.S_IFLNK:
        detail = os.fsencode(os.readlink(path))
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        detail = None
    size = None if fmt == stat.S_IFDIR else st.st_size
    xattrs = tuple(
        sorted(
            (n.encode(), os.getxattr(path, n, follow_symlinks=False))
            for n in os.listxattr(path, follow_symlinks=False)
            if n.startswith(XATTR_PREFIXES)
        )
    )
    return (
        fmt,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        size,
        detail,
        xattrs,
    )


def snapshot_tree(root: Node) -> Snapshot:
    """Snapshot an in-memory tree the same way."""
    entries: dict[str, Entry] = {}
    groups: dict[int, set[str]] = {}
    pending: list[tuple[str, Node]] = [("/", root)]
    while pending:
        path, node = pending.pop()
        entries[path] = _entry_from_node(node)
        if not node.is_dir:
            groups.setdefault(id(node), set()).add(path)
        for name, child in node.children.items():
            pending.append(((path.rstrip("/") + "/" + os.fsdecode(name)), child))
    return Snapshot(entries, frozenset(frozenset(v) for v in groups.values() if len(v) > 1))


def _entry_from_node(node: Node) -> Entry:
    detail: object = None
    if node.fmt == stat.S_IFREG:
        data = node.content.read(0, node.size) if node.content and node.size else b""
        detail = hashlib.sha256(data).hexdigest()
    elif node.fmt == stat.S_IFLNK:
        detail = node.target
    elif node.fmt in (stat.S_IFCHR, stat.S_IFBLK):
        detail = node.rdev
    size = None if node.is_dir else node.size
    # user.* xattrs exist only on regular files and directories (the VFS rule).
    prefixes = XATTR_PREFIXES if node.fmt in (stat.S_IFREG, stat.S_IFDIR) else XATTR_PREFIXES[1:]
    xattrs = tuple(
        sorted(
            (k, v)
            for k, v in node.xattrs.items()
            if k.decode(errors="replace").startswith(prefixes)
        )
    )
    return (node.fmt, node.mode, node.uid, node.gid, node.mtime_ns, size, detail, xattrs)


def diff(a: Snapshot, b: Snapshot) -> list[str]:
    """Human-readable differences (empty when the trees match)."""
    out = [f"only in first: {p}" for p in sorted(a.entries.keys() - b.entries.keys())]
    out += [f"only in second: {p}" for p in sorted(b.entries.keys() - a.entries.keys())]
    out += [
        f"{p}: {a.entries[p]} != {b.entries[p]}"
        for p in sorted(a.entries.keys() & b.entries.keys())
        if a.entries[p] != b.entries[p]
    ]
    if a.links != b.links:
        out.append(
            f"hard links differ: {sorted(map(sorted, a.links))} != {sorted(map(sorted, b.links))}"
        )
    return out


def snapshot_image(reader: ImageReader) -> Snapshot:
    """Snapshot an image through the project's own reader (no kernel, no root)."""
    entries: dict[str, Entry] = {}
    groups: dict[int, set[str]] = {}
    for raw_path, ino in reader.walk():
        path = os.fsdecode(raw_path)
        fmt = stat.S_IFMT(ino.mode)
        detail: object = None
        if fmt == stat.S_IFREG:
            detail = hashlib.sha256(reader.read(ino)).hexdigest()
        elif fmt == stat.S_IFLNK:
            detail = reader.read(ino)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = ino.header.i_u
            detail = ((i_u >> 8) & 0xFFF, (i_u & 0xFF) | ((i_u >> 12) & 0xFFF00))
        xattrs = tuple(
            sorted(
                (k, v)
                for k, v in ino.xattrs.items()
                if k.decode(errors="replace").startswith(XATTR_PREFIXES)
            )
        )
        entries[path] = (
            fmt,
            stat.S_IMODE(ino.mode),
            ino.header.uid,
            ino.header.gid,
            ino.mtime_ns,
            None if fmt == stat.S_IFDIR else ino.size,
            detail,
            xattrs,
        )
        if fmt != stat.S_IFDIR:
            groups.setdefault(ino.nid, set()).add(path)
    return Snapshot(entries, frozenset(frozenset(v) for v in groups.values() if len(v) > 1))


# -- hypothesis strategies for trees -----------------------------------------------

MiB = 1 << 20
_names = st.binary(min_size=1, max_size=30).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
_times = st.integers(0, 2**33).map(lambda s: s * 10**9) | st.integers(0, 2**62)
_shared = [b"", b"same small file\n", bytes(range(256)) * 4100, b"x" * (MiB + 77)]
_data = st.one_of(
    st.binary(max_size=700),
    # identical files across the tree: dedup within a build (sampled by index, so that
    # hypothesis does not build a megabyte repr of the choices)
    st.integers(0, len(_shared) - 1).map(lambda i: _shared[i]),
    st.integers(1, 300_000).map(lambda n: (b"abcdefg" * n)[:n]),
    st.integers(1, 2 * MiB + 9).map(bytes),  # all zeros: holes
    st.integers(0, 3 * MiB).map(lambda n: bytes(n) + b"tail"),  # sparse, then data
)


def _xattrs(big: int) -> st.SearchStrategy[dict[bytes, bytes]]:
    return st.dictionaries(
        st.sampled_from(
            [b"user.a", b"user.bb", b"trusted.t", b"security.s", b"trusted." + b"n" * 200]
        ),
        st.binary(max_size=big),
        max_size=3,
    )


def _leaf(big_xattrs: int) -> st.SearchStrategy[Node]:
    meta = {
        "mtime_ns": _times,
        "uid": st.integers(0, 2**32 - 2),
        "gid": st.integers(0, 70000),
        "xattrs": _xattrs(big_xattrs),
    }
    return st.one_of(
        st.builds(regular, _data, mode=st.integers(0, 0o7777), **meta),
        st.builds(
            symlink, st.binary(min_size=1, max_size=4095).filter(lambda t: b"\0" not in t), **meta
        ),
        st.builds(
            lambda fmt, rdev, mode, **kw: Node(fmt, mode, rdev=rdev, **kw),
            st.sampled_from([stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]),
            st.tuples(st.integers(0, 4095), st.integers(0, 2**20 - 1)),
            st.integers(0, 0o7777),
            **meta,
        ),
    )


def _dir(children: dict[bytes, Node], mode: int, mtime: int, xattrs: dict[bytes, bytes]) -> Node:
    d = directory(mode, mtime_ns=mtime, xattrs=xattrs)
    d.children.update(children)
    return d


def trees(big_xattrs: int = 300, max_leaves: int = 12) -> st.SearchStrategy[Node]:
    """Directory trees with every inode type, odd names, ids, times and xattrs."""
    dirs = st.recursive(
        _leaf(big_xattrs),
        lambda kids: st.builds(
            _dir,
            st.dictionaries(_names, kids, max_size=8),
            st.integers(0, 0o7777),
            _times,
            _xattrs(big_xattrs),
        ),
        max_leaves=max_leaves,
    )
    return st.builds(
        _dir,
        st.dictionaries(_names, dirs, max_size=8),
        st.integers(0, 0o7777),
        _times,
        _xattrs(big_xattrs),
    )
