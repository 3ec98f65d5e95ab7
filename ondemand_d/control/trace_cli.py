# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d trace`: the running daemon's request flow, live, as a table (like `demo`'s).

With `--kernel` it also reads the kernel's cachefiles_ondemand_* tracepoints and joins
them to the daemon's lines (ktrace.py).
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ondemand_d.control.commands import add_socket_argument, client

if TYPE_CHECKING:
    from ondemand_d.cli import Context

OPS = ("OPEN", "READ", "CLOSE")


HEADER = (f"{'time':12} {'op':5} {'msg':>6} {'obj':>5} {'key/blob':18} {'off':>10} {'len':>8} "
          f"{'chunks':>6} {'source':7} {'ms':>8} outcome")


def _cell(value: Any) -> Any:
    """A field as a cell: absent or null (fanotify events have no object id) is blank."""
    return "" if value is None else value


def row(line: dict[str, Any]) -> str:
    """One daemon line as a table row (like `demo`'s request flow).

    A fanotify event has no object id (its key is DOMAIN/BLOB): that cell is blank.
    """
    when = time.strftime("%H:%M:%S", time.localtime(line.get("ts", 0)))
    when += f".{int(line.get('ts', 0) * 1000) % 1000:03d}"
    op = line.get("op") or {"prefilled": "PFILL", "read_ahead": "AHEAD"}.get(
        line.get("event", ""), "-")
    what = str(line.get("key") or line.get("blob") or "")[:18]
    outcome = str(line.get("outcome") or line.get("event", ""))
    if line.get("error"):
        outcome += f" ({line['error']})"
    cells = {k: str(_cell(line.get(k))) for k in
             ("msg_id", "object_id", "off", "len", "chunks", "source", "duration_ms")}
    return (f"{when:12} {op:5} {cells['msg_id']:>6} {cells['object_id']:>5} "
            f"{what:18} {cells['off']:>10} {cells['len']:>8} {cells['chunks']:>6} "
            f"{cells['source']:7} {cells['duration_ms']:>8} {outcome}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--image", metavar="NAME", help="only this image's requests")
    parser.add_argument("--op", type=str.upper, choices=OPS, help="only this kind of request")
    parser.add_argument("--kernel", action="store_true",
                        help="also read the kernel's cachefiles_ondemand_* tracepoints (tracefs) "
                        "and join them to the daemon's lines by msg_id, object and range")
    parser.add_argument("--duration", type=float, metavar="S",
                        help="stop after S seconds (default: until Ctrl-C)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run(args: argparse.Namespace, ctx: Context) -> int:
    cfg = ctx.cfg
    query = "&".join(f"{k}={v}" for k, v in (("image", args.image), ("op", args.op)) if v)
    lines = client(args, cfg).lines("/trace" + (f"?{query}" if query else ""))
    first = next(lines)  # the daemon subscribed us: nothing after this point is missed
    assert first.get("event") == "_subscribed"  # noqa: S101 - the route's first line
    if args.kernel:
        from ondemand_d.control import ktrace  # noqa: PLC0415

        return ktrace.run(args, lines)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    shown = 0
    if not args.json:
        print(HEADER, flush=True)
    for line in _until(lines, deadline):
        print(json.dumps(line) if args.json else row(line), flush=True)
        shown += 1
    print(f"trace: {shown} line(s) shown", file=sys.stderr)
    return 0


def _until(lines: Any, deadline: float | None) -> Any:
    """The daemon's lines until `deadline` (read in a thread, so the deadline holds)."""
    q: queue.Queue[Any] = queue.Queue()

    def pump() -> None:
        try:
            for line in lines:
                q.put(line)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            q.put(exc)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            return
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item
