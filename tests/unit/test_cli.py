# SPDX-License-Identifier: Apache-2.0
"""The command line: import, ls, exit codes and the sentences a person reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ondemand_d import __version__
from ondemand_d.cli import COMMANDS, main


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


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_one_line_description_and_help(command, capsys):
    """`--help` lists each command with one plain line; `COMMAND --help` works for each."""
    text = COMMANDS[command].help
    assert text and "\n" not in text and not text.startswith(("`", " ")) and len(text) < 90
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ondemand-d {command}")
    assert "--store" in out and "--log-level" in out  # global options after the command too


def test_demo_summary_names_the_shared_blob(tmp_path, capsys):
    """demo's summary says which data blob both images use and that it was OPENed once."""
    from ondemand_d.guest import demo
    from ondemand_d.store.local import LocalStore

    src_a = tmp_path / "a"
    src_a.mkdir()
    (src_a / "big").write_bytes(os.urandom(200_000))
    src_b = tmp_path / "b"
    import shutil
    shutil.copytree(src_a, src_b)
    (src_b / "extra").write_bytes(os.urandom(50_000))
    store = tmp_path / "store"
    for name, src in (("demo-a", src_a), ("demo-b", src_b)):
        assert main(["--store", str(store), "build", str(src), "--name", name]) == 0
    capsys.readouterr()
    images = {i.name: i for i in LocalStore(store).images()}
    shared = images["demo-a"].devices[0][1]
    assert shared in {b for _, b in images["demo-b"].devices}
    log = tmp_path / "daemon.log"
    opens = [{"op": "OPEN", "msg_id": n, "object_id": n, "key": key, "blob": blob}
             for n, (key, blob) in enumerate([("demo-a", images["demo-a"].bootstrap),
                                              (shared, shared),
                                              ("demo-b", images["demo-b"].bootstrap)])]
    log.write_text("".join(json.dumps(e) + "\n" for e in opens))
    demo.report(log, store, files=3, checked=3, elapsed=1.0)
    out = capsys.readouterr().out
    assert f"shared data blob {shared[:12]}: used by demo-a and demo-b, OPENed once" in out
    assert f"{shared[:12]} x1" in out and shared[:13] not in out  # ids at one width
