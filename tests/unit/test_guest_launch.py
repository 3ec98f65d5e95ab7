# SPDX-License-Identifier: Apache-2.0
"""The interpreter the guest is given runs the project: its packages and every dependency.

The guest shares this machine's root, so a path that works here works there. A resolved base
interpreter (outside the virtualenv) has none of the project's packages on a fresh machine:
every launcher must use ``ondemand_d_argv()`` and this test fails when that interpreter
cannot import the project and each dependency declared in pyproject.toml.
"""
from __future__ import annotations

import json
import subprocess
import sys

from ondemand_d.guest.runner import guest_path, guest_python, ondemand_d_argv

# Run by the launch interpreter: import ondemand_d's modules and every declared dependency.
IMPORT_ALL = r"""
import importlib, importlib.metadata as md, json, re, sys
declared = [re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in md.requires("ondemand-d") or ()
            if "extra ==" not in r]
by_dist = {}
for module, dists in md.packages_distributions().items():
    for dist in dists:
        by_dist.setdefault(dist.lower().replace("_", "-"), []).append(module)
imported = {}
for dist in declared:
    modules = [m for m in by_dist.get(dist.lower().replace("_", "-"), []) if not m.startswith("_")]
    if not modules:
        sys.exit(f"dependency {dist} is not installed for {sys.executable}")
    for module in modules:
        importlib.import_module(module)
    imported[dist] = modules
for module in ("ondemand_d.cli", "ondemand_d.daemon", "ondemand_d.image.command",
               "ondemand_d.registry.command", "ondemand_d.guest.demo"):
    importlib.import_module(module)
print(json.dumps({"executable": sys.executable, "imported": imported}))
"""


def test_launch_interpreter_imports_project_and_dependencies() -> None:
    """`ondemand_d_argv()`'s interpreter imports ondemand_d and every declared dependency."""
    argv = ondemand_d_argv()
    assert argv[1:] == ["-m", "ondemand_d"]
    assert argv[0] == guest_python()
    out = subprocess.run([argv[0], "-c", IMPORT_ALL], capture_output=True, text=True,
                         env={"PATH": guest_path(), "LANG": "C.UTF-8"})
    assert out.returncode == 0, f"{argv[0]} cannot run the project:\n{out.stderr[-2000:]}"
    imported = json.loads(out.stdout)["imported"]
    for dist in ("structlog", "zstandard", "aiohttp", "uvloop", "cffi", "yarl"):
        assert dist in imported, imported


def test_launch_interpreter_runs_the_cli() -> None:
    """The exact argv every caller uses answers --version (a guest boot would run the same)."""
    out = subprocess.run([*ondemand_d_argv(), "--version"], capture_output=True, text=True,
                         env={"PATH": guest_path(), "LANG": "C.UTF-8"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ondemand-d ")


def test_guest_python_keeps_the_virtualenv() -> None:
    """Inside a virtualenv the guest's interpreter is the venv's, not the base it links to."""
    if sys.prefix != sys.base_prefix:
        assert guest_python().startswith(sys.prefix)
    else:
        assert guest_python() == __import__("os").path.realpath(sys.executable)
