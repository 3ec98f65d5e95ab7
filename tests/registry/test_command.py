# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d push` and `ondemand-d add` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ondemand_d.cli import main
from ondemand_d.store.local import LocalStore

from .conftest import Registry, make_image


def test_push_then_add_from_the_command_line(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """push prints progress and a summary; add registers the image under --name."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "cli", (4096, 200_000))
    ref = f"{registry.host}/test/cli:v1"
    cfg = ["--docker-config", str(tmp_path / "none.json")]
    with capture_logs():  # unconfigured structlog would print to stdout
        assert main(["--store", str(tmp_path / "src"), "push", "cli", ref, *cfg]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"pushed cli to {registry.host}/test/cli@sha256:")
    assert "5 layers, 5 uploaded" in out and "blob 2/2: data" in err
    with capture_logs():
        assert main(["--store", str(tmp_path / "dst"), "add", ref, "--name", "web", *cfg]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"added {ref} as web (sha256:") and "left in the registry" in out
    assert LocalStore(tmp_path / "dst").get_image("web").devices == image.devices


def test_errors_are_one_line_with_the_readmes_exit_code(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad reference is usage (2); a missing image or tag is a failure (1); one line each."""
    LocalStore(tmp_path / "s")
    store = ["--store", str(tmp_path / "s")]
    with capture_logs():
        _errors(store, registry, capsys)


def _errors(store: list[str], registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*store, "add", "no-registry-here"]) == 2
    assert "expected REGISTRY/REPO:TAG" in capsys.readouterr().err
    assert main([*store, "push", "absent", f"{registry.host}/test/x:v1"]) == 1
    assert "absent" in capsys.readouterr().err
    assert main([*store, "add", f"{registry.host}/test/never-pushed:v1"]) == 1
    assert "not found" in capsys.readouterr().err
