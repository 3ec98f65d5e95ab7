# SPDX-License-Identifier: Apache-2.0
"""pytest integration of the real-kernel guest (ondemand_d.guest).

* Collecting any test under tests/vm builds or reuses the guest kernels the selected tests
  need *before* they run (outside pytest-timeout, with progress shown live): the 6.12 kind for
  every test, the 7.2 kind only if a selected test is marked ``pytest.mark.kernel("7.2")``.
  Nothing is skipped: if a kernel or QEMU cannot be had, every vm test of it fails with the
  reason.
* ``guest`` (session fixture) runs commands in a fresh guest boot: ``guest.run(argv)``,
  ``guest.shell(script)``, ``guest.python(code_or_path, *args)``. ``guest_7_2`` is the same
  on the 7.2 kernel (its tests carry ``pytest.mark.kernel("7.2")``).
* ``guest.checks(__file__)`` boots once and runs every ``check_*`` function of a test module
  in the guest (tests/vm/harness.py); host tests then assert ``checks.passed("check_x")``.
  Pattern::

      @pytest.fixture(scope="module")
      def checks(guest):
          return guest.checks(__file__)

      def test_bind(checks):
          checks.passed("check_bind")

      @guard(30)
      def check_bind(ctx):       # runs in the guest as root
          ...
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import ondemand_d
from ondemand_d.guest import kernel as guest_kernel
from ondemand_d.guest.runner import GuestResult, guest_python, run_in_guest

VM_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(ondemand_d.__file__).resolve().parent.parent
#: pytest-timeout limit for one vm test (its module's guest boot runs in its setup).
VM_TEST_TIMEOUT = 1800  # above the sum of a module's check guards (scenarios: ~1230 s)

_kernel_key = pytest.StashKey[dict[str, Any]]()


def _kind_of(item: pytest.Item) -> str:
    marker = item.get_closest_marker("kernel")
    return str(marker.args[0]) if marker else guest_kernel.DEFAULT_KIND


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: `-m "not vm"` builds nothing
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give selected vm tests a longer timeout, and build their kernels once, up front.

    The test modules mark themselves ``pytestmark = pytest.mark.vm`` (static, so that
    ``-m "not vm"`` can deselect them before this hook runs).
    """
    vm_items = [item for item in items if VM_DIR in Path(str(item.path)).resolve().parents]
    for item in vm_items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(VM_TEST_TIMEOUT))
    if not vm_items or _kernel_key in config.stash:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    kernels: dict[str, Any] = {}
    config.stash[_kernel_key] = kernels

    def progress(line: str) -> None:
        print(f"\nkernel: {line}", file=sys.stderr, flush=True)

    def ensure(kind: str) -> Any:
        try:
            return guest_kernel.ensure_kernel(kind=kind, progress=progress)
        except Exception as exc:  # noqa: BLE001 - reported by every vm test of it instead
            return exc

    for kind in sorted({_kind_of(item) for item in vm_items}):
        if capture is not None:
            with capture.global_and_fixture_disabled():
                kernels[kind] = ensure(kind)
        else:
            kernels[kind] = ensure(kind)


def _kernel_image(config: pytest.Config, kind: str) -> Path:
    found = config.stash.get(_kernel_key, {}).get(kind)
    if found is None:  # collected without the hook, or unmarked: build now
        found = guest_kernel.ensure_kernel(kind=kind)
    if isinstance(found, BaseException):
        pytest.fail(f"the {kind} guest kernel could not be built or found: {found}",
                    pytrace=False)
    return Path(found.bzimage)


@pytest.fixture(scope="session")
def guest_kernel_image(pytestconfig: pytest.Config) -> Path:
    """The bzImage of the default (6.12) guest kernel (built before the tests ran)."""
    return _kernel_image(pytestconfig, guest_kernel.DEFAULT_KIND)


@dataclasses.dataclass
class Checks:
    """Outcome of one guest boot that ran a module's check_* functions."""

    result: GuestResult
    records: dict[str, dict[str, Any]]

    def record(self, name: str) -> dict[str, Any]:
        return self.records.get(name, {"status": "missing"})

    def data(self, name: str) -> dict[str, Any]:
        return dict(self.record(name).get("data") or {})

    def passed(self, name: str) -> dict[str, Any]:
        """Fail the calling test unless the guest check passed; return its data."""
        rec = self.record(name)
        if rec.get("status") != "passed":
            statuses = {n: r.get("status") for n, r in self.records.items()}
            detail = rec.get("error") or ("(no error recorded: the guest ended before this "
                                          f"check finished; all checks: {statuses})")
            pytest.fail(f"guest check {name}: {rec.get('status')}\n{detail}\n"
                        f"data: {json.dumps(rec.get('data'), default=str)[:4000]}\n"
                        f"{self.result.summary(tail=30)}", pytrace=False)
        return dict(rec.get("data") or {})


@dataclasses.dataclass
class Guest:
    """Runs commands in fresh guest boots; results dirs live under pytest's tmp dir."""

    kernel: Path
    tmp_factory: pytest.TempPathFactory

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {"PYTHONPATH": str(PACKAGE_ROOT)}
        env.update(extra or {})
        return env

    def run(self, argv: Sequence[str], *, timeout: float = 120,
            env: Mapping[str, str] | None = None, results_dir: Path | None = None,
            name: str = "guest", systemd: bool = False) -> GuestResult:
        """Boot, run argv as root, return the GuestResult (not checked).

        ``systemd=True`` boots systemd as PID 1 and runs argv as a oneshot service once
        multi-user.target is up (ondemand_d.guest.sysboot).
        """
        results = results_dir or self.tmp_factory.mktemp(name)
        return run_in_guest(list(argv), env=self.env(env), timeout=timeout, results_dir=results,
                            kernel=self.kernel, cwd=str(PACKAGE_ROOT), systemd=systemd)

    def shell(self, script: str, **kwargs: Any) -> GuestResult:
        """Run a /bin/sh script (``set -e`` is not implied)."""
        return self.run(["/bin/sh", "-c", script], **kwargs)

    def python(self, code_or_path: str | Path, *args: str, **kwargs: Any) -> GuestResult:
        """Run Python code (a string) or a script (a Path) with the host's real interpreter."""
        if isinstance(code_or_path, Path):
            return self.run([guest_python(), str(code_or_path), *args], **kwargs)
        return self.run([guest_python(), "-c", code_or_path, *args], **kwargs)

    def checks(self, test_file: str, names: Sequence[str] = (), *, timeout: float | None = None,
               env: Mapping[str, str] | None = None, results_dir: Path | None = None,
               systemd: bool = False) -> Checks:
        """Boot once and run the module's check_* functions (all, or ``names``) in the guest.

        ``results_dir`` may already hold inputs prepared by the host (same path in the guest).
        """
        stem = Path(test_file).stem
        results = results_dir or self.tmp_factory.mktemp(stem)
        out = results / "checks.json"
        if timeout is None:
            timeout = (90 if systemd else 60) + sum(_guard_of(test_file, n) + 15 for n in names or _check_names(
                test_file))
        result = self.python(VM_DIR / "harness.py", str(Path(test_file).resolve()), str(out),
                             *names, timeout=timeout, env=env, results_dir=results,
                             systemd=systemd)
        try:
            records = json.loads(out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            records = {}
        if not records:
            pytest.fail(f"the guest harness did not start for {stem}:\n{result.summary()}",
                        pytrace=False)
        return Checks(result, records)


def _module(test_file: str) -> Any:
    wanted = os.path.realpath(test_file)
    return next((m for m in list(sys.modules.values())
                 if getattr(m, "__file__", None) and os.path.realpath(m.__file__) == wanted),
                None)


def _check_names(test_file: str) -> list[str]:
    module = _module(test_file)
    return [n for n in vars(module) if n.startswith("check_")] if module else []


def _guard_of(test_file: str, name: str) -> float:
    module = _module(test_file)
    return float(getattr(getattr(module, name, None), "timeout", 60))


@pytest.fixture(scope="session")
def guest(guest_kernel_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """Run commands in the real-kernel guest (see the module docstring)."""
    return Guest(guest_kernel_image, tmp_path_factory)


@pytest.fixture(scope="session")
def guest_7_2(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """Like ``guest``, on the 7.2 kernel (mark the test ``pytest.mark.kernel("7.2")``)."""
    return Guest(_kernel_image(pytestconfig, "7.2"), tmp_path_factory)
