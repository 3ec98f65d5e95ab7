# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d build`: arguments, the summary line, --json, errors and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ondemand_d.cli import main
from ondemand_d.image import command
from ondemand_d.store import LocalStore


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100_000)
    (src / "b").write_bytes(b"tiny")
    return src


def test_parse_size() -> None:
    """Sizes take K/M/G (and KiB/MiB) suffixes and must be powers of two >= 4 KiB."""
    assert command.parse_size("1M") == command.parse_size("1MiB") == 1 << 20
    assert command.parse_size("65536") == command.parse_size("64k") == 1 << 16
    for bad in ("3M", "1000", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            command.parse_size(bad)


def test_build_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A build ends with one line saying what it did, and how to mount the result."""
    store = tmp_path / "store"
    assert main(["--store", str(store), "build", str(_src(tmp_path)), "--name", "app"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("built image 'app': 2 files, 97.7 KiB; extents 1 total, 1 new")
    image = LocalStore(store).get_image("app")
    (data,) = [LocalStore(store).get_blob(b) for _, b in image.devices]
    assert f"in {len(data.chunks)} chunks)" in out[0]  # the count `ls` shows
    assert out[1] == "mount it with: mount -t erofs none -o fsid=app /mnt"
    assert LocalStore(store).get_image("app").devices


def test_build_json_and_replace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the report; a second build needs --replace; --chunk-size is honoured."""
    store, src = str(tmp_path / "store"), str(_src(tmp_path))
    assert main(["--store", store, "build", src, "--name", "app", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["files"], report["chunks_new"], report["inline_files"]) == (2, 1, 1)
    assert main(["--store", store, "build", src, "--name", "app"]) == 1
    assert "pass --replace" in capsys.readouterr().err
    argv = [
        "--store",
        store,
        "build",
        src,
        "--name",
        "app",
        "--replace",
        "--json",
        "--chunk-size",
        "64K",
        "--fingerprint",
    ]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["chunks_reused"] == 1 and again["new_blob"] is None


def test_bad_source_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing source or a corrupt tarball exits 1 with the reason on stderr."""
    store = str(tmp_path / "store")
    assert main(["--store", store, "build", str(tmp_path / "nope.tar"), "--name", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"junk" * 50)
    assert main(["--store", store, "build", str(tmp_path / "junk.tar.gz"), "--name", "x"]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert list(LocalStore(store).images()) == []


def test_layers_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several tarballs are stacked in the order given."""
    from tests.unit.test_image_source_tar import make_layer

    lower = make_layer(tmp_path / "1.tar.gz", [("a", "f", b"lower"), ("b", "f", b"b")], "gzip")
    upper = make_layer(tmp_path / "2.tar.zst", [("a", "f", b"upper"), (".wh.b", "f", b"")], "zstd")
    store = tmp_path / "store"
    assert main(["--store", str(store), "build", str(lower), str(upper), "--name", "l"]) == 0
    assert "built image 'l': 1 files" in capsys.readouterr().out


def test_progress_lines_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """Long builds report progress on stderr, and say when they are done."""
    import sys

    progress = command._Progress("img", sys.stderr)
    progress.INTERVAL = 0
    progress(512 << 20, 1 << 30)
    progress.done()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("building img: 512.0 MiB of 1.0 GiB (50%)")
    assert err[1] == "building img: done"
