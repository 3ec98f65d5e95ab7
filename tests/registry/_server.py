# SPDX-License-Identifier: Apache-2.0
"""Start and stop Debian's docker-registry (CNCF distribution) on 127.0.0.1 for tests.

Each registry gets its own config file, storage directory and free port; the
system's /etc/docker/registry is never read. Usable outside pytest (e.g. by a
guest scenario): ``reg = start_registry(dir)`` ... ``stop_registry(reg)``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ._tls import make_tls
from ._token_server import ISSUER, SERVICE, TokenServer

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
USER, PASSWORD = "alice", "pa55-w0rd-never-logged"


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    storage: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    tokens: TokenServer | None = None
    ca_file: Path | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(workdir: Path, auth: str = "") -> Registry:
    """Start docker-registry in `workdir`; auth is "", "htpasswd", "token" or "tls"."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    port = _free_port()
    config = [
        "version: 0.1",
        "log: {level: warn, accesslog: {disabled: true}}",
        f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}",
        f"http: {{addr: '127.0.0.1:{port}', secret: test-secret}}",
    ]
    tokens = None
    ca_file = None
    if auth == "tls":
        ca_file, cert, key = make_tls(workdir)
        config[-1] = (
            f"http: {{addr: '127.0.0.1:{port}', secret: test-secret, "
            f"tls: {{certificate: {cert}, key: {key}}}}}"
        )
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        subprocess.run(
            ["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True, capture_output=True
        )
        config.append(f"auth: {{htpasswd: {{realm: ondemand-d-test, path: {htpasswd}}}}}")
    elif auth == "token":
        tokens = TokenServer(workdir, USER, PASSWORD).__enter__()
        config.append(
            f"auth: {{token: {{realm: '{tokens.realm}', service: {SERVICE}, issuer: {ISSUER}, "
            f"rootcertbundle: {tokens.bundle}}}}}"
        )
    (workdir / "config.yml").write_text("\n".join(config) + "\n")
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [REGISTRY_BIN, "serve", str(workdir / "config.yml")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    reg = Registry(f"127.0.0.1:{port}", storage, proc, log_path, tokens, ca_file)
    scheme = "https" if ca_file else "http"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # bounded: the registry starts in well under a second
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{scheme}://{reg.host}/v2/", timeout=1, context=context)  # noqa: S310
            return reg
        except urllib.error.HTTPError:
            return reg  # 401 is an answer too
        except OSError:
            time.sleep(0.05)
    stop_registry(reg)
    raise RuntimeError("docker-registry did not start within 15 s")


def stop_registry(reg: Registry) -> None:
    """Stop the registry (and its token server) started by start_registry."""
    reg.process.terminate()
    try:
        reg.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        reg.process.kill()
        reg.process.wait()
    if reg.tokens is not None:
        reg.tokens.__exit__()
