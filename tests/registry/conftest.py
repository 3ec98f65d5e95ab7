# SPDX-License-Identifier: Apache-2.0
"""Fixtures: a real CNCF distribution registry on 127.0.0.1, with and without auth.

Each registry gets its own config file, storage directory and free port; the
system's /etc/docker/registry is never read. The no-auth registry is shared by
the module's tests (each test uses its own repository name).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ondemand_d.registry import reference
from ondemand_d.registry.add import add
from ondemand_d.registry.client import RegistryClient
from ondemand_d.registry.config import RegistryConfig
from ondemand_d.registry.push import push
from ondemand_d.store.local import LocalStore
from ondemand_d.store.model import Blob, Image

from ._proxy import FaultProxy
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


def _start(workdir: Path, auth: str = "") -> Registry:
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
    _stop(reg)
    raise RuntimeError("docker-registry did not start within 15 s")


def _stop(reg: Registry) -> None:
    reg.process.terminate()
    try:
        reg.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        reg.process.kill()
        reg.process.wait()
    if reg.tokens is not None:
        reg.tokens.__exit__()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry without authentication."""
    reg = _start(tmp_path_factory.mktemp("registry"))
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry that wants HTTP basic credentials (htpasswd, bcrypt)."""
    reg = _start(tmp_path_factory.mktemp("registry-htpasswd"), "htpasswd")
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry that wants bearer tokens from the test token server."""
    reg = _start(tmp_path_factory.mktemp("registry-token"), "token")
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry on 127.0.0.1 over TLS, its certificate signed by a throwaway CA."""
    reg = _start(tmp_path_factory.mktemp("registry-tls"), "tls")
    yield reg
    _stop(reg)


def docker_config(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    """Write a Docker-style config.json with basic credentials for `host`."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def make_image(
    store: LocalStore, workdir: Path, name: str, sizes: tuple[int, ...], chunk: int = 64 << 10
) -> Image:
    """An image of a random bootstrap and data blobs (not a real EROFS; the store does not care)."""
    import random  # noqa: PLC0415

    rng = random.Random(name)
    blobs = []
    for i, size in enumerate(sizes):
        # Half random, half text-like, so zstd has something to do and something not.
        data = bytearray(rng.randbytes(size // 2))
        data += (f"line {i} " * (size // 7 + 1)).encode()[: size - len(data)]
        path = workdir / f"{name}-{i}.bin"
        path.write_bytes(bytes(data))
        blobs.append(store.ingest_file(path, chunk_size=chunk))
    boot, *data_blobs = blobs
    image = Image(name, boot.blob_id, tuple((b.blob_id, b.blob_id) for b in data_blobs))
    store.put_image(image)
    return image


def blob_bytes(store: LocalStore, blob_id: str) -> bytes:
    blob = store.get_blob(blob_id)
    return b"".join(store.read_chunk(c) for c in blob.chunks)


#: Every fault test must finish within this many seconds (asyncio.wait_for).
BOUND_S = 10.0
#: Short timeouts and backoff, so a fault costs the tests little time.
FAST = RegistryConfig(
    read_timeout=0.5, request_timeout=2.0, retries=2, backoff_base=0.01, backoff_max=0.05
)


@dataclass
class Remote:
    proxy: FaultProxy
    blob: Blob  # as added through the proxy
    data: bytes  # the blob's true bytes


@pytest.fixture
async def remote(registry: Registry, tmp_path: Path) -> AsyncIterator[Remote]:
    """An image pushed to the registry and added (to tmp_path/dst) through a fault proxy."""
    src = LocalStore(tmp_path / "src")
    image = make_image(src, tmp_path, "lazy", (8192, 3_000_000))
    proxy = await FaultProxy(registry.host).start()
    try:
        dst = LocalStore(tmp_path / "dst")
        async with RegistryClient(RegistryConfig()) as client:
            await push(src, "lazy", reference.parse(f"{registry.host}/test/lazy:v1"), client)
            await add(dst, reference.parse(f"{proxy.host}/test/lazy:v1"), client)
        blob_id = image.devices[0][1]
        proxy.blob_bytes = 0
        proxy.seen.clear()
        yield Remote(proxy, dst.get_blob(blob_id), blob_bytes(src, blob_id))
    finally:
        await proxy.stop()
