# SPDX-License-Identifier: Apache-2.0
"""Layer tarballs: compression, whiteouts, opaque dirs, links, metadata, and hostile input."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from ondemand_d.errors import ImageError
from ondemand_d.image.source_tar import read_layers
from ondemand_d.image.tree import Node

Member = tuple[str, str, bytes | str]  # (name, kind, data or link target)


def make_layer(
    path: Path,
    members: list[Member],
    compression: str = "none",
    pax: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write a tar layer: kinds f(ile) d(ir) l(symlink) h(ardlink) c(hardev) p(fifo)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            info.mode = 0o755 if kind == "d" else 0o644
            info.pax_headers = dict((pax or {}).get(name, {}))
            body = None
            if kind == "f":
                assert isinstance(data, bytes)
                info.size, body = len(data), io.BytesIO(data)
            else:
                info.type = {
                    "d": tarfile.DIRTYPE,
                    "l": tarfile.SYMTYPE,
                    "h": tarfile.LNKTYPE,
                    "c": tarfile.CHRTYPE,
                    "p": tarfile.FIFOTYPE,
                }[kind]
                if kind in "lh":
                    assert isinstance(data, str)
                    info.linkname = data
                if kind == "c":
                    info.devmajor, info.devminor = 1, 3
            tar.addfile(info, body)
    raw = buf.getvalue()
    if compression == "gzip":
        raw = gzip.compress(raw, mtime=0)
    elif compression == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


def read_all(node: Node, path: bytes) -> bytes:
    for part in path.split(b"/"):
        node = node.children[part]
    assert node.content is not None
    return node.content.read(0, node.size)


BASE: list[Member] = [
    ("./", "d", b""),
    ("etc", "d", b""),
    ("etc/passwd", "f", b"root:x:0:0\n"),
    ("etc/gone", "f", b"bye"),
    ("opq", "d", b""),
    ("opq/old", "f", b"old"),
    ("bin", "d", b""),
    ("bin/sh", "f", b"#!" * 3000),
    ("bin/bash", "h", "bin/sh"),
    ("null", "c", b""),
    ("fifo", "p", b""),
    ("lnk", "l", "/etc/passwd"),
]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layer_compressions_give_the_same_tree(tmp_path: Path, compression: str) -> None:
    """tar, tar+gzip and tar+zstd are recognised by their magic number."""
    layer = make_layer(tmp_path / "l.tar", BASE, compression)
    with read_layers([layer]) as stack:
        root = stack.root
        assert read_all(root, b"etc/passwd") == b"root:x:0:0\n"
        assert root.children[b"bin"].children[b"bash"] is root.children[b"bin"].children[b"sh"]
        assert root.children[b"null"].fmt == stat.S_IFCHR and root.children[b"null"].rdev == (1, 3)
        assert root.children[b"fifo"].fmt == stat.S_IFIFO
        assert root.children[b"lnk"].target == b"/etc/passwd"
        assert root.children[b"etc"].mode == 0o755 and root.mtime_ns == 1_700_000_000 * 10**9


def test_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    """.wh.NAME removes a lower entry; .wh..wh..opq hides the lower dir's content only."""
    lower = make_layer(tmp_path / "1.tar", BASE)
    upper = make_layer(
        tmp_path / "2.tar",
        [
            ("opq/new", "f", b"new"),  # before the marker in the same layer: must survive
            ("opq/.wh..wh..opq", "f", b""),
            ("etc/.wh.gone", "f", b""),
            ("etc/passwd", "f", b"root:x:0:0:changed\n"),
            ("nothere/.wh.x", "f", b""),  # a whiteout for nothing is harmless
        ],
        "gzip",
    )
    with read_layers([lower, upper]) as stack:
        root = stack.root
        assert sorted(root.children[b"etc"].children) == [b"passwd"]
        assert sorted(root.children[b"opq"].children) == [b"new"]
        assert read_all(root, b"etc/passwd") == b"root:x:0:0:changed\n"
        assert b"nothere" not in root.children  # a whiteout implies no directory


def test_pax_xattrs_and_nanosecond_mtime(tmp_path: Path) -> None:
    """SCHILY.xattr.* become xattrs; a PAX mtime keeps its nanoseconds."""
    layer = make_layer(
        tmp_path / "x.tar",
        [("f", "f", b"data")],
        pax={
            "f": {
                "SCHILY.xattr.user.k": "v",
                "SCHILY.xattr.security.capability": "cap",
                "mtime": "1700000000.123456789",
            }
        },
    )
    with read_layers([layer]) as stack:
        f = stack.root.children[b"f"]
        assert f.xattrs == {b"user.k": b"v", b"security.capability": b"cap"}
        assert f.mtime_ns == 1_700_000_000_123_456_789


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../evil", "f", b"x")], "escapes the root"),
        ([("a/../../evil", "f", b"x")], "escapes the root"),
        ([("/etc/passwd", "f", b"x")], "absolute path"),
        ([("link", "l", "/etc"), ("link/passwd", "f", b"x")], "goes through symlink"),
        ([("d", "l", "."), ("d/.wh..wh..opq", "f", b"")], "goes through symlink"),
        ([("h", "h", "../../etc/shadow")], "escapes the root"),
        ([("h", "h", "missing")], "no file to point at"),
        ([("f", "f", b"x"), ("f/g", "f", b"y")], "to be a directory"),
        ([("n" * 256, "f", b"x")], "at most 255"),
    ],
)
def test_hostile_members_are_refused(tmp_path: Path, members: list[Member], message: str) -> None:
    """Paths that would escape the root or run through a symlink fail with a clear error."""
    layer = make_layer(tmp_path / "bad.tar", members)
    with pytest.raises(ImageError, match=message):
        read_layers([layer])


def test_truncated_and_corrupt_archives(tmp_path: Path) -> None:
    """Cut or garbled archives are reported as such, naming the layer."""
    good = make_layer(tmp_path / "g.tar", BASE, "gzip").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    plain = make_layer(tmp_path / "p.tar", [("big", "f", b"z" * 100000)]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(plain[:50000])
    (tmp_path / "junk.tar").write_bytes(b"\x28\xb5\x2f\xfd" + b"not zstd at all" * 10)
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("cut.tar.gz", "cut.tar", "junk.tar", "empty.tar"):
        with pytest.raises(ImageError, match=f"{name}.*(truncated or corrupt|truncated)"):
            read_layers([tmp_path / name])


def test_non_utf8_names_and_binary_xattrs(tmp_path: Path) -> None:
    """Names and xattr values are bytes: non-UTF-8 and NUL-containing values survive."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        info = tarfile.TarInfo("caf\udce9")
        info.size = 3
        value = b"\xff\x00\x01".decode("utf-8", "surrogateescape")
        info.pax_headers = {"SCHILY.xattr.user.bin": value}
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "l.tar").write_bytes(buf.getvalue())
    with read_layers([tmp_path / "l.tar"]) as stack:
        node = stack.root.children[b"caf\xe9"]
        assert node.xattrs == {b"user.bin": b"\xff\x00\x01"}
        assert read_all(stack.root, b"caf\xe9") == b"abc"
