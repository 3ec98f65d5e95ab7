# SPDX-License-Identifier: Apache-2.0
"""A throw-away docker-registry on 127.0.0.1 for the benchmarks (imports nothing heavy)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def start_registry(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {workdir / 'storage'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}', secret: bench}}\n"
    )
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        ["docker-registry", "serve", str(config)],  # noqa: S607
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):  # bounded: 15 s
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)  # noqa: S310
            return proc, f"127.0.0.1:{port}"
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    proc.kill()
    sys.exit("docker-registry did not start")
