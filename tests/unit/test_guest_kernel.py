# SPDX-License-Identifier: Apache-2.0
"""The guest kernel kinds (ondemand_d.guest.kernel.KINDS): cache keys, config checks, CLI.

Nothing here fetches or builds: the cache is a tmp_path with files laid out as a build
leaves them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ondemand_d.guest import kernel, runner


def test_default_kind_keeps_its_cache_key() -> None:
    """The 6.12 kind hashes its one fragment as before kinds (its cached kernel is reused)."""
    assert kernel.DEFAULT_KIND == "6.12"
    assert kernel.fragment_hash(*kernel.KINDS["6.12"].fragments) == kernel.fragment_hash()
    assert kernel.fragment_hash() == kernel.fragment_hash(kernel.FRAGMENT)


def test_7_2_kind_is_its_own_row() -> None:
    """7.2: sid's linux-source-7.2, the guest fragment then its own, its own cache key."""
    kind = kernel.KINDS["7.2"]
    assert (kind.package, kind.suite) == ("linux-source-7.2", "sid")
    assert kind.fragments == (kernel.FRAGMENT, kernel.FRAGMENT_7_2)
    assert kernel.fragment_hash(*kind.fragments) != kernel.fragment_hash()


def test_7_2_requires_every_option_of_its_fragment() -> None:
    """The 7.2 kind checks each option its fragment sets, as the 6.12 kind checks ONDEMAND."""
    options = {line.split("=", 1)[0] for line in kernel.fragment_lines(kernel.FRAGMENT_7_2)}
    assert options == set(kernel.KINDS["7.2"].required)
    assert options == {"CONFIG_FANOTIFY", "CONFIG_FANOTIFY_ACCESS_PERMISSIONS",
                       "CONFIG_EROFS_FS_XATTR", "CONFIG_EROFS_FS_BACKED_BY_FILE",
                       "CONFIG_EROFS_FS_PAGE_CACHE_SHARE", "CONFIG_CGROUPS", "CONFIG_MEMCG"}


def test_check_config_names_a_lost_7_2_option(tmp_path: Path) -> None:
    """A .config that lost one 7.2 option is an error naming it; with all it passes."""
    kind = kernel.KINDS["7.2"]
    config = tmp_path / ".config"
    full = "".join(f"{name}=y\n" for name in kind.required)
    config.write_text(full.replace("CONFIG_EROFS_FS_PAGE_CACHE_SHARE=y\n",
                                   "# CONFIG_EROFS_FS_PAGE_CACHE_SHARE is not set\n"))
    with pytest.raises(kernel.KernelBuildError, match="CONFIG_EROFS_FS_PAGE_CACHE_SHARE"):
        kernel.check_config(config, kind.fragments, kind.required)
    config.write_text(full)
    warnings = kernel.check_config(config, kind.fragments, kind.required)
    assert not any("CONFIG_FANOTIFY" in w or "EROFS_FS_XATTR" in w for w in warnings), warnings


def test_later_fragment_wins_in_check_config(tmp_path: Path) -> None:
    """An option set by both fragments is checked against the later one (merge order)."""
    a, b, config = tmp_path / "a.config", tmp_path / "b.config", tmp_path / ".config"
    a.write_text("# CONFIG_X is not set\nCONFIG_Y=y\n")
    b.write_text("CONFIG_X=y\n")
    config.write_text("CONFIG_X=y\nCONFIG_Y=y\n")
    assert kernel.check_config(config, (a, b), ()) == []
    assert kernel.check_config(config, (a,), ()) == ["CONFIG_X=n requested, got y"]


def _fake_build(root: Path, version: str, fhash: str) -> Path:
    out = root / f"{version}-{fhash}"
    out.mkdir(parents=True)
    (out / "bzImage").write_bytes(b"kernel")
    (out / "meta.json").write_text(json.dumps({"version": version}))
    return out / "bzImage"


def test_each_kind_finds_only_its_own_cached_kernel(tmp_path: Path) -> None:
    """Cached kernels are keyed per kind: a 6.12 build never answers for 7.2 and back."""
    h612 = kernel.fragment_hash(*kernel.KINDS["6.12"].fragments)
    h72 = kernel.fragment_hash(*kernel.KINDS["7.2"].fragments)
    assert kernel.cached_kernel(tmp_path, "7.2") is None
    old = _fake_build(tmp_path, "6.12.117-1", h612)
    assert kernel.cached_kernel(tmp_path, "7.2") is None
    assert kernel.cached_kernel(tmp_path) == old
    new = _fake_build(tmp_path, "7.2.13-1", h72)
    assert kernel.cached_kernel(tmp_path, "7.2") == new
    found = kernel.ensure_kernel(kind="7.2", cache_dir=tmp_path, install=False)
    assert (found.bzimage, found.kind, found.version, found.built) == (new, "7.2", "7.2.13-1",
                                                                       False)


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    """Asking for a kind that is not in KINDS names the known ones; nothing is fetched."""
    with pytest.raises(kernel.KernelBuildError, match=r"'6\.13'.*6\.12, 7\.2"):
        kernel.ensure_kernel(kind="6.13", cache_dir=tmp_path, install=False)
    assert not (tmp_path / "apt").exists()


def test_private_apt_state_is_per_suite(tmp_path: Path) -> None:
    """trixie keeps the `apt` dir it always had; sid gets its own sources list and lists."""
    assert kernel._apt_dir(tmp_path, "trixie") == tmp_path / "apt"
    sid = kernel._PrivateApt(kernel._apt_dir(tmp_path, "sid"), "sid")
    assert sid.root == tmp_path / "apt-sid"
    assert (sid.root / "sources.list").read_text().split()[-2:] == ["sid", "main"]
    assert f"Dir::State::Lists={sid.root / 'lists'}" in sid.options


def test_cli_reuses_cached_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--kind all` reports each kind's cached kernel; nothing is built."""
    for kind, version in (("6.12", "6.12.117-1"), ("7.2", "7.2.13-1")):
        _fake_build(tmp_path, version, kernel.fragment_hash(*kernel.KINDS[kind].fragments))
    assert kernel.main(["--kind", "all", "--cache-dir", str(tmp_path), "--no-install"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (kind ")[1].split(",")[0] for line in out] == ["6.12", "7.2"]
    assert all(line.startswith("kernel: reused cached linux-source-") for line in out)


def test_runner_boots_the_asked_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_in_guest(kernel_kind="7.2") asks ensure_kernel for 7.2 and boots what it returns."""
    asked: list[str] = []

    def fake_ensure(*, kind: str = kernel.DEFAULT_KIND, **_: object) -> kernel.Kernel:
        asked.append(kind)
        raise kernel.KernelBuildError(f"stop before QEMU ({kind})")

    monkeypatch.setattr(kernel, "ensure_kernel", fake_ensure)
    with pytest.raises(kernel.KernelBuildError, match=r"\(7\.2\)"):
        runner.run_in_guest(["true"], kernel_kind="7.2", results_dir=tmp_path)
    with pytest.raises(kernel.KernelBuildError, match=r"\(6\.12\)"):
        runner.run_in_guest(["true"], results_dir=tmp_path)
    assert asked == ["7.2", "6.12"]
