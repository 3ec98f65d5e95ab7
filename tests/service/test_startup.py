# SPDX-License-Identifier: Apache-2.0
"""What `serve` of local images loads: nothing of the registry client, the builder or aiohttp.

Each check runs a fresh interpreter (this one has imported everything already): the
daemon starts on the fake kernel, serves an OPEN and a READ of a local image, and
reports `sys.modules`. The control socket is on, as by default; its HTTP server loads
when a client connects, and then answers.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path

    from fakekernel import FakeKernel, RecordingBackend
    from ondemand_d import _native, daemon
    from ondemand_d.config import load
    from ondemand_d.device import Device
    from ondemand_d.store.local import LocalStore
    from ondemand_d.store.model import Image

    async def main(tmp: Path, ask: bool) -> dict:
        store = LocalStore(tmp / "store")
        (tmp / "f").write_bytes(bytes(range(256)) * 100)
        store.put_image(Image("k", store.ingest_file(tmp / "f").blob_id))
        (tmp / "cache").mkdir()
        kernel = FakeKernel(tmp / "cache")
        kernel.start()
        real = _native.load_backend
        _native.load_backend = lambda c=None: RecordingBackend(real(c), kernel)
        cfg = load(None, {}, {"store": str(tmp / "store"), "cache_dir": str(tmp / "c"),
                              "control_socket": str(tmp / "ctl")})
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.serve(cfg, Device(kernel.device_fd, cfg.device), stop))
        obj = await kernel.open(b"k")
        out = {"size": obj.copen_result, "read": await kernel.read(obj, 0, 25600),
               "data": kernel.cache_bytes(obj)[:25600] == (tmp / "f").read_bytes()}
        kernel.close(obj)
        out["modules"] = sorted(sys.modules)
        if ask:
            from ondemand_d.control.client import ControlClient
            status = await asyncio.to_thread(ControlClient(tmp / "ctl", 60).get, "/status")
            out["status_images"] = [i["name"] for i in status["images"]]
            out["modules_after"] = sorted(sys.modules)
        stop.set()
        await task
        kernel.stop()
        return out

    print(json.dumps(asyncio.run(main(Path(sys.argv[1]), sys.argv[2] == "ask"))))
""")

#: Loaded by a daemon that serves local images: none of these may be.
FORBIDDEN = ("aiohttp", "yarl", "multidict", "zstandard", "aiofiles", "ondemand_d.image",
             "ondemand_d.importer", "ondemand_d.imagesdir", "ondemand_d.guest",
             "ondemand_d.control.trace", "ondemand_d.control.metrics", "ondemand_d.control.cull")
#: The [registry] table's settings are part of the daemon's Config (a dataclass, no I/O and
#: no third-party import); nothing else of the registry package may load.
REGISTRY_ALLOWED = {"ondemand_d.registry", "ondemand_d.registry.config"}


def _serve(tmp: Path, ask: bool) -> dict:  # noqa: FBT001
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp), "ask" if ask else "quiet"],
        env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules
            if m.startswith(FORBIDDEN)
            or (m.startswith("ondemand_d.registry") and m not in REGISTRY_ALLOWED)]


def test_serving_local_images_loads_no_registry_builder_or_http(tmp_path):
    out = _serve(tmp_path, ask=False)
    assert (out["size"], out["read"], out["data"]) == (25600, True, True)
    assert _forbidden(out["modules"]) == []
    assert "ondemand_d.store.fetch" in out["modules"]  # the check sees the serve path


def test_control_socket_loads_its_server_on_the_first_client(tmp_path):
    out = _serve(tmp_path, ask=True)
    assert "aiohttp" not in out["modules"]
    assert out["status_images"] == ["k"]
    assert {"aiohttp", "ondemand_d.control.metrics"} <= set(out["modules_after"])


async def test_control_server_that_cannot_load_says_so_and_lets_go(tmp_path):
    """The HTTP side fails to load on the first client: one log line, the client is let
    go (not left waiting in the backlog), and stop() still cleans up."""
    import asyncio

    from structlog.testing import capture_logs

    from ondemand_d.control.client import ControlClient, ControlUnavailable
    from ondemand_d.control.server import ControlServer

    server = ControlServer(tmp_path / "ctl", ["ondemand_d.no_such_views"])
    with capture_logs() as logs:
        await server.start()
        assert (tmp_path / "ctl").exists() and not server.loaded
        client = ControlClient(tmp_path / "ctl", timeout=20)
        try:
            await asyncio.to_thread(client.get, "/status")
            raise AssertionError("a server without views answered")
        except ControlUnavailable:
            pass
        await server.stop()
    failed = [e for e in logs if e["event"] == "control_unavailable"]
    assert len(failed) == 1 and "no_such_views" in failed[0]["error"]
    assert not (tmp_path / "ctl").exists()
