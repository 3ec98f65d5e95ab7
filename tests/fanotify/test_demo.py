# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d demo` runs natively through the fanotify front end (no guest, no kernel build)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_here(tmp_path: Path) -> None:
    """Both images mounted in one domain, every file identical, the shared blob filled once."""
    out = subprocess.run([sys.executable, "-m", "ondemand_d", "demo", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "through the fanotify front end" in out.stdout
    checked, files = map(int, re.search(r"compared with the source: (\d+)/(\d+) identical",
                                        out.stdout).groups())  # type: ignore[union-attr]
    assert checked == files > 100
    assert re.search(r"used by demo-a and demo-b\): one file, (\d+) of \1 bytes filled, "
                     r"each chunk once", out.stdout)
