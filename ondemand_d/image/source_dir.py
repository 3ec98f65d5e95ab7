# SPDX-License-Identifier: Apache-2.0
"""Read a directory on disk into a tree: metadata now, file bytes on demand."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ondemand_d.errors import ImageError
from ondemand_d.image.tree import FileContent, Node, check_name


def read_directory(root: str | os.PathLike[str]) -> Node:
    """Walk `root` without following symlinks and return its tree.

    Hard links inside the tree (same st_dev and st_ino) become one Node.
    Mount points below `root` are walked like any directory.

    Raises:
        ImageError: `root` is not a directory, or an entry cannot be listed or stat()ed.
    """
    top = os.fsencode(Path(root))
    try:
        st = os.lstat(top)
    except OSError as exc:
        msg = f"cannot open source {os.fsdecode(top)}: {exc.strerror}"
        raise ImageError(msg) from exc
    if not stat.S_ISDIR(st.st_mode):
        msg = f"source {os.fsdecode(top)} is not a directory"
        raise ImageError(msg)
    links: dict[tuple[int, int], Node] = {}
    root_node = _node(top, st)
    pending = [(top, root_node)]
    while pending:
        path, node = pending.pop()
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            msg = f"cannot list {os.fsdecode(path)}: {exc.strerror}"
            raise ImageError(msg) from exc
        for name in names:
            child_path = path + b"/" + name
            check_name(name, f" in {os.fsdecode(path)}")
            try:
                cst = os.lstat(child_path)
            except OSError as exc:
                msg = f"cannot stat {os.fsdecode(child_path)}: {exc.strerror}"
                raise ImageError(msg) from exc
            key = (cst.st_dev, cst.st_ino)
            if not stat.S_ISDIR(cst.st_mode) and cst.st_nlink > 1 and key in links:
                node.children[name] = links[key]
                continue
            child = _node(child_path, cst)
            node.children[name] = child
            if stat.S_ISDIR(cst.st_mode):
                pending.append((child_path, child))
            elif cst.st_nlink > 1:
                links[key] = child
    return root_node


def _node(path: bytes, st: os.stat_result) -> Node:
    node = Node(
        stat.S_IFMT(st.st_mode),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        _xattrs(path),
    )
    if stat.S_ISREG(st.st_mode):
        node.content = FileContent(os.fsdecode(path), st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        try:
            node.target = os.readlink(path)
        except OSError as exc:
            msg = f"cannot read symlink {os.fsdecode(path)}: {exc.strerror}"
            raise ImageError(msg) from exc
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return node


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENODATA):  # the filesystem keeps none
            return {}
        msg = f"cannot list xattrs of {os.fsdecode(path)}: {exc.strerror}"
        raise ImageError(msg) from exc
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            msg = f"cannot read xattr {name} of {os.fsdecode(path)}: {exc.strerror}"
            raise ImageError(msg) from exc
    return out
