# SPDX-License-Identifier: Apache-2.0
"""The command line: import, ls, exit codes and the sentences a person reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ondemand_d import __version__
from ondemand_d.cli import main


def _mkfs(tmp_path, blobdev: bool):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    (src / "b").write_text("b\n")
    meta = tmp_path / "img.erofs"
    args = ["mkfs.erofs", "--chunksize=65536"]
    if blobdev:
        args.append(f"--blobdev={tmp_path / 'blob.img'}")
    subprocess.run([*args, str(meta), str(src)], check=True, capture_output=True)
    return meta


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_import_blobdev_image_and_ls(tmp_path, capsys):
    meta = _mkfs(tmp_path, blobdev=True)
    store = str(tmp_path / "store")
    assert main(["--store", store, "import", str(meta), "--name", "img1",
                 "--blob", f"{tmp_path / 'blob.img'}=blob1"]) == 0
    out = capsys.readouterr().out
    assert "mount -t erofs none -o fsid=img1,device=blob1 /mnt" in out
    assert main(["--store", store, "ls", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    (image,) = listing["images"]
    assert image["name"] == "img1"
    assert [b["role"] for b in image["blobs"]] == ["bootstrap", "data"]
    assert image["blobs"][1]["size"] == (tmp_path / "blob.img").stat().st_size
    assert image["blobs"][0]["size"] == meta.stat().st_size


def test_import_wrong_blob_count_is_clear(tmp_path, capsys):
    meta = _mkfs(tmp_path, blobdev=True)
    assert main(["--store", str(tmp_path / "s"), "import", str(meta), "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert "1 extra device(s)" in err and "--blob" in err
    assert not (tmp_path / "s").exists()  # inputs are checked before the store is created


def test_import_not_erofs(tmp_path, capsys):
    (tmp_path / "junk").write_bytes(b"\0" * 8192)
    assert main(["--store", str(tmp_path / "s"), "import", str(tmp_path / "junk"),
                 "--name", "x"]) == 1
    assert "not an EROFS image" in capsys.readouterr().err


def test_serve_without_device_says_what_to_do(tmp_path, capsys):
    rc = main(["--store", str(tmp_path / "s"), "serve", "--device", str(tmp_path / "nodev"),
               "--cache-dir", str(tmp_path / "cache"), "--log-format", "json"])
    assert rc == 4
    assert "CONFIG_CACHEFILES_ONDEMAND=y" in capsys.readouterr().err


def test_bad_config_file_exit_3(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("concurency = 3\n")
    assert main(["--config", str(cfg), "ls"]) == 3
    assert "unknown key 'concurency'" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ondemand_d", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("serve", "import", "ls", "build", "push", "add", "demo"):
        assert command in out
