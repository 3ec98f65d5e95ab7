# SPDX-License-Identifier: Apache-2.0
"""The CLI commands that talk to a running daemon: status, inflight (and their output)."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ondemand_d.config import Config
from ondemand_d.control.client import ControlClient, ControlUnavailable

if TYPE_CHECKING:
    from ondemand_d.cli import Context


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, metavar="PATH",
                        help="the daemon's control socket (default: control_socket, "
                        "/run/ondemand-d/control.sock)")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


add_inflight_arguments = add_status_arguments
add_metrics_arguments = add_socket_argument


def client(args: argparse.Namespace, cfg: Config) -> ControlClient:
    path = args.socket or cfg.control_socket
    if path is None:
        msg = "the control socket is off (control_socket is empty): pass --socket PATH"
        raise ControlUnavailable(msg)
    return ControlClient(path)


def size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def yes(flag: object) -> str:
    return "yes" if flag else "no"


def _kernel_line(k: dict[str, Any]) -> str:
    """The features of the front ends that run (fscache's only where it is served)."""
    parts = []
    if k.get("fscache", True):  # a daemon before the key: fscache
        parts.append(f"fscache (restore {yes(k['restore'])}, share domains {yes(k['domain'])}, "
                     f"tracing {yes(k['tracing'])})")
    if k.get("fanotify_pre_content"):
        parts.append("fanotify (pre-content events)")
    if not k.get("fscache", True):
        parts.append("no /dev/cachefiles: fscache not served")
    return f"kernel {k['release']}: " + ", ".join(parts)


def _fanotify_counts(fan: dict[str, Any]) -> list[str]:
    out = [f"fanotify events since start: {fan['events']} ({fan['already_filled']} already "
           f"filled, {fan['fills']} filled, {fan['denied']} denied), "
           f"{size(fan['bytes_filled'])} written to blob files"]
    for r in fan["reads"]:
        out.append(f"  {r['source']:7} {r['outcome']:14} {r['count']:>8}  {size(r['bytes'])}")
    if fan["read_errors"]:
        out.append("  errors: " + ", ".join(f"{k} {v}" for k, v in fan["read_errors"].items()))
    return out


def run_status(args: argparse.Namespace, ctx: Context) -> int:
    cfg = ctx.cfg
    st = client(args, cfg).get("/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    k = st["kernel"]
    out = [
        f"ondemand-d {st['version']}, pid {st['pid']}, up {duration(st['uptime_s'])}"
        + (" (took over a previous instance's device: restored)" if st["restored"] else ""),
        _kernel_line(k),
        f"cache {st['cache_dir']} (tag {st['tag']}), store {st['store']}, "
        f"backend {st['backend']}",
        f"objects open {st['objects_open']}, READs in flight {st['reads_in_flight']}",
        f"images ({len(st['images'])}):",
    ]
    unknown = False
    for img in st["images"]:
        share = f" ({100 * img['cached_bytes'] // img['size']}%)" if img["size"] else ""
        more = " and ?" if img.get("cached_unknown") else ""
        origin = f", from {', '.join(img['locations'])}" if img.get("locations") else ""
        out.append(f"  {img['name']}  {len(img['blobs'])} blob(s), {size(img['size'])}, "
                   f"cached {size(img['cached_bytes'])}{share}{more}{origin}")
        for b in img["blobs"]:
            cached = "?" if b["cached_bytes"] is None else size(b["cached_bytes"])
            unknown |= b["cached_bytes"] is None
            out.append(f"    {b['role']:9} {b['blob'][:12]}  {size(b['size']):>10}  cached "
                       f"{cached:>10}  key={b['key']}" + ("  open" if b["open"] else ""))
    if unknown:
        out.append("  (cached ?: not open since this instance took over; a cache file the "
                   "kernel still holds is measured once it is read again or unmounted)")
    fan = st.get("frontends", {}).get("fanotify")
    if fan is not None:
        out.append(f"fanotify mounts ({len(fan['mounts'])}):")
        for m in fan["mounts"]:
            size_all = sum(b["size"] for b in m["blobs"])
            filled = sum(b["filled_bytes"] for b in m["blobs"])
            out.append(f"  {m['mountpoint']}  {m['image']} (domain {m['domain']}), "
                       f"{size(size_all)}, filled {size(filled)}"
                       + (f", {m['options']}" if m.get("options") else "")
                       + (f", sharing {m['sharing']}" if m.get("sharing") else ""))
        if fan.get("nosuid") is False:
            out.append("  (mount_nosuid = false: setuid files and device nodes of images "
                       "take effect)")
        for d in fan.get("denied_mounts", []):
            detached = "detached" if d["detached"] else "NOT detached"
            out.append(f"  {d['mountpoint']}  {d['image']} DENIED ({detached}): {d['reason']}")
        out += _fanotify_counts(fan)
    c = st["counters"]  # the fscache front end's (fanotify's are above)
    if k.get("fscache", True):
        out.append("requests since start:")
        for r in c["requests"]:
            out.append(f"  {r['op']:5} {r['outcome']:14} {r['count']:>8}")
        out.append("READs by source:")
        for r in c["reads"]:
            out.append(f"  {r['source']:7} {r['outcome']:14} {r['count']:>8}  "
                       f"{size(r['bytes'])}")
        if c["read_errors"]:
            out.append("READ errors: " + ", ".join(f"{name} {n}"
                                                   for name, n in c["read_errors"].items()))
    print("\n".join(out))
    return 0


def run_inflight(args: argparse.Namespace, ctx: Context) -> int:
    cfg = ctx.cfg
    view = client(args, cfg).get("/inflight")
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    rows: list[dict[str, Any]] = view["reads"]
    if rows:
        print(f"{'msg_id':>8} {'object':>6} {'age s':>8}  {'waits on':8} {'off':>12} "
              f"{'len':>8}  blob          key")
    for r in rows:
        obj = "-" if r["object_id"] is None else r["object_id"]  # a fanotify event has none
        print(f"{r['msg_id']:>8} {obj:>6} {r['age_s']:>8.2f}  {r['waits_on']:8} "
              f"{r['off']:>12} {r['len']:>8}  {r['blob'][:12]}  {r['key']}"
              + ("  HUNG" if r["hung"] else ""))
    print(f"{len(rows)} READ(s) in flight, {view['hung']} older than {view['hung_after_s']} s",
          file=sys.stderr)
    return 0


def run_metrics(args: argparse.Namespace, ctx: Context) -> int:
    """Print /metrics (e.g. for node_exporter's textfile collector)."""
    cfg = ctx.cfg
    sys.stdout.write(client(args, cfg).text("/metrics"))
    return 0
