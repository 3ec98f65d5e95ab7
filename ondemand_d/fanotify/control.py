# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d mount` / `umount`: the CLI side and the control socket's routes."""
from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ondemand_d.control.commands import add_socket_argument, client
from ondemand_d.control.server import ControlServer, json_error, json_ok
from ondemand_d.control.status import runtime
from ondemand_d.errors import MountError

if TYPE_CHECKING:
    from ondemand_d.cli import Context


def _frontend(request: web.Request) -> Any:
    frontends = runtime(request).frontends
    return frontends.get("fanotify"), frontends.get("fanotify_unavailable")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                 content_type="application/json")
    return body


def _unavailable(reason: str | None) -> web.Response:
    return json_error(409, "this daemon has no fanotify front end: "
                      + (reason or "it serves only /dev/cachefiles"))


async def mount_view(request: web.Request) -> web.Response:
    frontend, reason = _frontend(request)
    if frontend is None:
        return _unavailable(reason)
    body = await _body(request)
    image, mountpoint, domain = body.get("image"), body.get("mountpoint"), body.get("domain")
    if not isinstance(image, str) or not isinstance(mountpoint, str) or not (
            domain is None or isinstance(domain, str)):
        return json_error(400, "mount needs \"image\" and \"mountpoint\" strings")
    try:
        return json_ok(await frontend.mount(image, mountpoint, domain))
    except MountError as exc:
        return json_error(400, str(exc))


async def umount_view(request: web.Request) -> web.Response:
    frontend, reason = _frontend(request)
    if frontend is None:
        return _unavailable(reason)
    body = await _body(request)
    mountpoint = body.get("mountpoint")
    if not isinstance(mountpoint, str):
        return json_error(400, "umount needs a \"mountpoint\" string")
    try:
        return json_ok(await frontend.umount(mountpoint, lazy=bool(body.get("lazy"))))
    except MountError as exc:
        return json_error(400, str(exc))


async def mounts_view(request: web.Request) -> web.Response:
    frontend, reason = _frontend(request)
    if frontend is None:
        return _unavailable(reason)
    return json_ok(frontend.status())


def add_routes(server: ControlServer) -> None:
    server.add_route("POST", "/fanotify/mount", mount_view)
    server.add_route("POST", "/fanotify/umount", umount_view)
    server.add_route("GET", "/fanotify", mounts_view)


# ---------------------------------------------------------------------------- CLI


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Mount an image of the store through the running daemon's fanotify "
                          "front end: a file-backed EROFS mount whose data is filled on demand.")
    parser.add_argument("name", help="the image's name (as `ls` shows it)")
    parser.add_argument("mountpoint", help="an existing directory")
    parser.add_argument("--domain", help="share domain: images mounted in one domain share "
                        "the files of their common blobs and, on Linux 7.0+ with verified fingerprints "
                        "(build --fingerprint), their page cache (default: the image's own; "
                        "no page-cache sharing)")
    add_socket_argument(parser)


def run_mount(args: argparse.Namespace, ctx: Context) -> int:
    body = {"image": args.name, "mountpoint": os.path.abspath(args.mountpoint),
            "domain": args.domain}
    done = client(args, ctx.cfg).post("/fanotify/mount", body)
    blobs = done["blobs"]
    print(f"mounted {done['image']} on {done['mountpoint']} (domain {done['domain']}, "
          f"{len(blobs) - 1} data blob(s), sharing {done.get('sharing', '?')})")
    return 0


def add_umount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Unmount an image the running daemon mounted: readers waiting for "
                          "its data get EIO, then it is unmounted.")
    parser.add_argument("mountpoint")
    parser.add_argument("--lazy", action="store_true",
                        help="detach it even while files are open there (MNT_DETACH)")
    add_socket_argument(parser)


def run_umount(args: argparse.Namespace, ctx: Context) -> int:
    done = client(args, ctx.cfg).post(
        "/fanotify/umount", {"mountpoint": os.path.abspath(args.mountpoint),
                             "lazy": args.lazy})
    print(f"unmounted {done['image']} from {done['mountpoint']}")
    return 0
