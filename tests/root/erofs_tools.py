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

from ondemand_d.image.materialize import ImageFiles, materialize
from ondemand_d.image.tree import Node
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
            out = subprocess.run(["losetup", "-f", "--show", "-r", str(path)],
                                 capture_output=True, text=True, check=True)
            loops.append(out.stdout.strip())
        opts = ",".join(["ro", *(f"device={d}" for d in loops[1:])])
        subprocess.run(["mount", "-t", "erofs", "-o", opts, loops[0], str(target)],
                       capture_output=True, text=True, check=True)
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
    xattrs = tuple(sorted(
        (n.encode(), os.getxattr(path, n, follow_symlinks=False))
        for n in os.listxattr(path, follow_symlinks=False) if n.startswith(XATTR_PREFIXES)
    ))
    return (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, size, detail,
            xattrs)


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
    xattrs = tuple(sorted(
        (k, v) for k, v in node.xattrs.items() if k.decode(errors="replace").startswith(prefixes)
    ))
    return (node.fmt, node.mode, node.uid, node.gid, node.mtime_ns, size, detail, xattrs)


def diff(a: Snapshot, b: Snapshot) -> list[str]:
    """Human-readable differences (empty when the trees match)."""
    out = [f"only in first: {p}" for p in sorted(a.entries.keys() - b.entries.keys())]
    out += [f"only in second: {p}" for p in sorted(b.entries.keys() - a.entries.keys())]
    out += [f"{p}: {a.entries[p]} != {b.entries[p]}"
            for p in sorted(a.entries.keys() & b.entries.keys()) if a.entries[p] != b.entries[p]]
    if a.links != b.links:
        out.append(f"hard links differ: {sorted(map(sorted, a.links))} != {sorted(map(sorted, b.links))}")
    return out
