# SPDX-License-Identifier: Apache-2.0
"""Reading a directory: types, hard links, xattrs, sorted and without following symlinks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ondemand_d.errors import ImageError
from ondemand_d.image.source_dir import read_directory


def test_reads_metadata_and_links(tmp_path: Path) -> None:
    """Modes, ids, ns mtimes, xattrs, symlinks, hard links (one node) and special files."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(b"data")
    os.chown(src / "f", 1234, 5678)  # before chmod: chown clears set-uid
    os.chmod(src / "f", 0o4751)
    os.setxattr(src / "f", "user.k", b"v")
    os.utime(src / "f", ns=(1, 1_700_000_000_123_456_789))
    os.link(src / "f", src / "sub" / "g")
    os.symlink("../f", src / "sub" / "l")
    os.mkfifo(src / "p")
    root = read_directory(src)
    f = root.children[b"f"]
    assert (f.mode, f.uid, f.gid, f.mtime_ns) == (0o4751, 1234, 5678, 1_700_000_000_123_456_789)
    assert f.xattrs[b"user.k"] == b"v" and f.content is not None and f.content.read(0, 4) == b"data"
    assert root.children[b"sub"].children[b"g"] is f
    assert root.children[b"sub"].children[b"l"].target == b"../f"
    assert root.children[b"p"].fmt == stat.S_IFIFO


def test_sparse_file_reports_its_holes(tmp_path: Path) -> None:
    """SEEK_DATA lets the builder skip holes without reading them."""
    path = tmp_path / "src" / "sparse"
    path.parent.mkdir()
    with path.open("wb") as f:
        f.seek(8 << 20)
        f.write(b"x")
    content = read_directory(tmp_path / "src").children[b"sparse"].content
    assert content is not None
    assert not content.has_data(0, 1 << 20)
    assert content.has_data(8 << 20, 1 << 20)


def test_not_a_directory(tmp_path: Path) -> None:
    """A file or a missing path as the source is a clear error."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageError, match="is not a directory"):
        read_directory(tmp_path / "file")
    with pytest.raises(ImageError, match="cannot open source"):
        read_directory(tmp_path / "missing")
