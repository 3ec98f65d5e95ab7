# SPDX-License-Identifier: Apache-2.0
"""`GET /trace?image=NAME&op=READ`: the daemon's request lines, live, as JSON lines.

The first line (`{"event": "_subscribed"}`) says the subscription is in place;
`trace_cli.py` is the command that prints them.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ondemand_d.control.server import ControlServer, json_error
from ondemand_d.control.status import runtime
from ondemand_d.errors import StoreError

OPS = ("OPEN", "READ", "CLOSE")


def image_filter(store: Any, name: str) -> Callable[[dict[str, Any]], bool]:
    """Lines about the image `name`: its cookie keys (fsid, device keys) or its blobs."""
    image = store.get_image(name)
    keys = {image.name, *(k for k, _ in image.devices)}
    blobs = set(image.blob_ids)
    return lambda line: line.get("key") in keys or line.get("blob") in blobs


async def trace_view(request: web.Request) -> web.StreamResponse:
    rt = runtime(request)
    op = request.query.get("op", "").upper()
    if op and op not in OPS:
        return json_error(400, f"op {op!r} is not one of {', '.join(OPS)}")
    wanted: Callable[[dict[str, Any]], bool] = lambda _line: True  # noqa: E731
    if name := request.query.get("image"):
        try:
            wanted = await asyncio.get_running_loop().run_in_executor(
                None, image_filter, rt.service.store, name)
        except (StoreError, OSError) as exc:
            return json_error(404, f"no image {name!r} in the store: {exc}")
    sub = rt.observer.subscribe()
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        await resp.write(b'{"event": "_subscribed"}\n')
        while True:
            line = await sub.queue.get()
            if line.get("event") == "_end":
                break
            if (op and line.get("op") != op) or not wanted(line):
                continue
            if sub.dropped:
                line["dropped_before"], sub.dropped = sub.dropped, 0
            await resp.write(json.dumps(line, default=str).encode() + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        rt.observer.unsubscribe(sub)
    return resp


def add_routes(server: ControlServer) -> None:
    server.add_route("GET", "/trace", trace_view)
