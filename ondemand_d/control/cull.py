# SPDX-License-Identifier: Apache-2.0
"""`POST /cull` and `ondemand-d cull IMAGE|--unused`: give back the disk that cache files hold.

The daemon asks the kernel (`inuse`, `cull` on the device), which refuses any file an
object holds (a mounted image's blob); it never unlinks a file under `cache/` itself.
Culled files go to the graveyard, which the daemon then empties. The fanotify front end
removes its own blob files (`fanotify/<domain>/<blob id>`) that no mount uses. With the
store's gc this gives disk space back.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from ondemand_d import cachedir
from ondemand_d.control.server import ControlServer, json_error, json_ok
from ondemand_d.control.status import Runtime, runtime
from ondemand_d.errors import StoreError

if TYPE_CHECKING:
    from ondemand_d.cli import Context

log = structlog.get_logger()


def targets(rt: Runtime, image: str | None) -> list[cachedir.CacheFile]:
    """The cache files to try: all of them, or those of one image's cookie keys and blobs."""
    files = list(cachedir.cache_files(rt.cfg.cache_dir))
    if image is None:
        return files
    store = rt.service.store
    found = store.get_image(image)
    keys = {found.name, *(k for k, _ in found.devices)}
    blobs = set(found.blob_ids)

    def belongs(f: cachedir.CacheFile) -> bool:
        if f.key in keys:
            return True
        try:
            return f.key is not None and store.resolve(f.key.encode()).blob_id in blobs
        except (StoreError, OSError):
            return False

    return [f for f in files if belongs(f)]


async def cull_view(request: web.Request) -> web.Response:
    rt = runtime(request)
    try:
        body = await request.json()
    except ValueError:
        body = {}
    image = body.get("image")
    if not image and not body.get("unused"):
        return json_error(400, "say what to cull: an image name, or unused for every cache "
                               "file no mounted image holds")
    loop = asyncio.get_running_loop()
    try:
        files = await loop.run_in_executor(None, targets, rt, image)
    except (StoreError, OSError) as exc:
        return json_error(404, f"no image {image!r} in the store: {exc}")
    # Synchronously on the loop thread: cachefiles resolves the names against our cwd,
    # so no other cull may interleave (the daemon's own paths are all absolute).
    results = cachedir.cull(rt.device.command, rt.cfg.cache_dir, files)
    fanotify = rt.frontends.get("fanotify")
    if fanotify is not None:
        try:
            blobs = None if image is None else set(
                rt.service.store.get_image(image).blob_ids)
        except (StoreError, OSError) as exc:
            return json_error(404, f"no image {image!r} in the store: {exc}")
        results += fanotify.cull(blobs)
    freed = sum(r.bytes for r in results if r.outcome == "culled")
    counts = {o: sum(r.outcome == o for r in results) for o in ("culled", "in_use", "gone")}
    log.info("culled", image=image, bytes_freed=freed, **counts)
    return json_ok({"image": image, "bytes_freed": freed, **counts,
                    "files": [{"path": str(r.path), "key": r.key, "outcome": r.outcome,
                               "bytes": r.bytes} for r in results]})


def add_routes(server: ControlServer) -> None:
    server.add_route("POST", "/cull", cull_view)


# ------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ondemand_d.control.commands import add_socket_argument  # noqa: PLC0415

    add_socket_argument(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("image", nargs="?", help="cull the cache files of this image's blobs")
    what.add_argument("--unused", action="store_true",
                      help="cull every cache file that no mounted image holds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, ctx: Context) -> int:
    cfg = ctx.cfg
    from ondemand_d.control.commands import client, size  # noqa: PLC0415

    body: dict[str, Any] = {"image": args.image} if args.image else {"unused": True}
    result = client(args, cfg).post("/cull", body)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for f in result["files"]:
        print(f"{f['outcome']:7} {size(f['bytes']):>10}  {f['key'] or f['path']}")
    print(f"culled {result['culled']} cache file(s), freed {size(result['bytes_freed'])}; "
          f"{result['in_use']} in use by mounted images (kept)")
    return 0
