# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d trace --kernel`: the kernel's cachefiles_ondemand_* tracepoints, joined to the
daemon's request lines by msg_id and object, one row per request.

The tracepoints (include/trace/events/cachefiles.h, Linux 6.3+) print hex fields:

    cachefiles_ondemand_read:     o=<debug id> mid=<msg_id> oid=<object_id> s=<off> l=<len>
    cachefiles_ondemand_fd_write: o=<debug id> iB=<backing inode> s=<pos> l=<len>
    cachefiles_ondemand_cread:    o=<debug id> mid=<msg_id>        (the READ completed)
    cachefiles_ondemand_open / _copen / _close / _fd_release

They are enabled in a private tracefs instance whose clock is CLOCK_MONOTONIC, the
clock of the daemon's `mono` field, so a READ's row splits its time into: queued in the
kernel until the daemon took it, fetch and verify until its first write into the cache
file, write and completion, and the total the reader waited.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ondemand_d.errors import OndemandError

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("open", "copen", "read", "fd_write", "cread", "close", "fd_release")
_LINE = re.compile(r"(?P<ts>\d+\.\d+):\s+cachefiles_ondemand_(?P<event>\w+):\s+(?P<args>.*)$")
DECIMAL_FIELDS = {"fd"}
#: How long a request waits for its other half before its row is printed as it is.
JOIN_WAIT = 2.0


class TraceUnavailable(OndemandError):
    """The kernel's tracepoints cannot be used; the message says why."""


def parse(line: str) -> dict[str, Any] | None:
    """One trace_pipe line -> {"event", "ts", fields...}, or None for other lines."""
    m = _LINE.search(line)
    if m is None:
        return None
    out: dict[str, Any] = {"event": m["event"], "ts": float(m["ts"])}
    for word in m["args"].split():
        key, _, value = word.partition("=")
        with contextlib.suppress(ValueError):
            out[key] = int(value, 10 if key in DECIMAL_FIELDS else 16)
    return out


class KernelTrace:
    """A private tracefs instance with the cachefiles_ondemand_* events on; read it with
    `events()` (a thread feeds a queue), tear it down with `close()`."""

    def __init__(self, tracefs: Path = TRACEFS) -> None:
        self.tracefs = tracefs
        self.instance = tracefs / "instances" / f"ondemand-d-{os.getpid()}"
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> KernelTrace:
        if not (self.tracefs / "instances").is_dir():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(self.tracefs)],
                           check=False, capture_output=True)
        if not (self.tracefs / "events" / "cachefiles" / "cachefiles_ondemand_read").is_dir():
            msg = (f"{self.tracefs} has no cachefiles_ondemand_* events: the kernel needs "
                   "CONFIG_FTRACE and CONFIG_CACHEFILES_ONDEMAND (and this must run as root)")
            raise TraceUnavailable(msg)
        try:
            self.instance.mkdir()
            (self.instance / "trace_clock").write_text("mono")
            for name in EVENTS:
                (self.instance / "events" / "cachefiles" / f"cachefiles_ondemand_{name}"
                 / "enable").write_text("1")
        except OSError as exc:
            self.close()
            msg = f"cannot set up tracing in {self.instance}: {exc.strerror}"
            raise TraceUnavailable(msg) from exc
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        fd = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        rest = b""
        try:
            while not self._stop.is_set():
                if not poller.poll(200):
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                *lines, rest = (rest + chunk).split(b"\n")
                for raw in lines:
                    event = parse(raw.decode(errors="replace"))
                    if event is not None:
                        self.events.put(event)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        with contextlib.suppress(OSError):
            for name in EVENTS:
                (self.instance / "events" / "cachefiles" / f"cachefiles_ondemand_{name}"
                 / "enable").write_text("0")
        with contextlib.suppress(OSError):
            self.instance.rmdir()


@dataclass
class Request:
    msg_id: int
    first_seen: float
    kernel: dict[str, dict[str, Any]] = field(default_factory=dict)  # event -> fields
    daemon: dict[str, Any] | None = None

    def complete(self) -> bool:
        if self.daemon is None:
            return False
        op = self.daemon.get("op")
        if op == "READ":
            return "read" in self.kernel and "cread" in self.kernel
        if op == "OPEN":
            return "open" in self.kernel and ("copen" in self.kernel or self.daemon.get(
                "outcome") != "ok")
        return "close" in self.kernel


class Joiner:
    """Pairs kernel events and daemon lines by msg_id; hands out finished requests."""

    def __init__(self) -> None:
        self.pending: dict[int, Request] = {}
        self.writes: dict[int, list[dict[str, Any]]] = {}  # debug id -> fd_write events
        self.objects: set[Any] = set()  # object ids the daemon's lines named

    def _request(self, msg_id: int) -> Request:
        req = self.pending.get(msg_id)
        if req is None:
            req = self.pending[msg_id] = Request(msg_id, time.monotonic())
        return req

    def kernel(self, ev: dict[str, Any]) -> None:
        if ev["event"] == "fd_write":
            self.writes.setdefault(ev.get("o", 0), []).append(ev)
            return
        if "mid" in ev:
            self._request(ev["mid"]).kernel[ev["event"]] = ev

    def daemon(self, line: dict[str, Any]) -> None:
        if line.get("op") in ("OPEN", "READ", "CLOSE") and "msg_id" in line:
            self._request(int(line["msg_id"])).daemon = line
            self.objects.add(line.get("object_id"))

    def ready(self, now: float, flush: bool = False) -> Iterator[dict[str, Any]]:
        for msg_id, req in sorted(self.pending.items()):
            if flush or req.complete() or now - req.first_seen > JOIN_WAIT:
                del self.pending[msg_id]
                yield self.joined(req)

    def joined(self, req: Request) -> dict[str, Any]:
        """One row: ids, range, the kernel's timestamps turned into phases (ms)."""
        k, d = req.kernel, req.daemon or {}
        first = k.get("read") or k.get("open") or k.get("close") or {}
        row: dict[str, Any] = {
            "op": d.get("op") or {"read": "READ", "open": "OPEN", "close": "CLOSE"}.get(
                next(iter(k), ""), "?"),
            "msg_id": req.msg_id, "object_id": d.get("object_id", first.get("oid")),
            "debug_id": first.get("o"), "off": d.get("off", first.get("s")),
            "len": d.get("len", first.get("l")), "key": d.get("key"),
            "source": d.get("source"), "chunks": d.get("chunks"),
            "outcome": d.get("outcome") or ("pending" if not k.get("cread") else "?"),
            "kernel_events": sorted(k),
        }
        start = first.get("ts")
        if "read" in k:
            end = k.get("cread", {}).get("ts")
            taken = (d["mono"] - d["duration_ms"] / 1000) if "mono" in d else None
            write = self._first_write(k["read"], taken or start, end)
            row["queued_ms"] = _ms(start, taken)
            row["fetch_ms"] = _ms(taken, write)
            row["write_ms"] = _ms(write, end)
            row["total_ms"] = _ms(start, end)
        elif "open" in k:
            row["total_ms"] = _ms(start, k.get("copen", {}).get("ts"))
            row["size"] = k.get("copen", {}).get("l")
        row["daemon_ms"] = d.get("duration_ms")
        return row

    def _first_write(self, read: dict[str, Any], after: float | None,
                     before: float | None) -> float | None:
        for w in self.writes.get(read.get("o", 0), []):
            if after is not None and w["ts"] < after:
                continue
            if before is not None and w["ts"] > before:
                break
            if w.get("s", 0) <= read.get("s", 0) < w.get("s", 0) + w.get("l", 0):
                return float(w["ts"])
        return None


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 3)


HEADER = (f"{'op':5} {'msg':>6} {'obj':>5} {'off':>10} {'len':>8} {'queued':>8} {'fetch':>8} "
          f"{'write':>8} {'total':>8} {'source':7} {'outcome':8} kernel events")


def table_row(r: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    return (f"{r['op']:5} {r['msg_id']:>6} {cell(r['object_id']):>5} {cell(r['off']):>10} "
            f"{cell(r['len']):>8} {cell(r.get('queued_ms')):>8} {cell(r.get('fetch_ms')):>8} "
            f"{cell(r.get('write_ms')):>8} {cell(r.get('total_ms')):>8} "
            f"{cell(r['source']):7} {r['outcome']:8} {','.join(r['kernel_events'])}")


def run(args: argparse.Namespace, lines: Iterator[dict[str, Any]]) -> int:
    """Join the daemon's `lines` with the tracepoints until --duration ends (or Ctrl-C)."""
    trace = KernelTrace().open()
    merged: queue.Queue[tuple[str, Any]] = queue.Queue()

    def pump_daemon() -> None:
        for line in lines:
            merged.put(("daemon", line))
        merged.put(("end", None))

    threading.Thread(target=pump_daemon, daemon=True).start()
    joiner = Joiner()
    deadline = None if args.duration is None else time.monotonic() + args.duration
    shown = 0
    if not args.json:
        print(f"times in ms; queued: in the kernel until the daemon took it, fetch: store or "
              f"registry and verify, write: into the cache file until completed\n{HEADER}",
              flush=True)
    try:
        ended = False
        while not ended and (deadline is None or time.monotonic() < deadline):
            with contextlib.suppress(queue.Empty):
                while True:
                    joiner.kernel(trace.events.get_nowait())
            try:
                kind, item = merged.get(timeout=0.1)
                if kind == "end":
                    ended = True
                else:
                    joiner.daemon(item)
            except queue.Empty:
                pass
            for r in joiner.ready(time.monotonic()):
                shown += _show(r, args, joiner)
    except KeyboardInterrupt:
        pass
    finally:
        time.sleep(0.3)  # the last events still in the pipe
        trace.close()
    with contextlib.suppress(queue.Empty):
        while True:
            joiner.kernel(trace.events.get_nowait())
    for r in joiner.ready(time.monotonic(), flush=True):
        shown += _show(r, args, joiner)
    print(f"trace: {shown} request(s) shown", file=sys.stderr)
    return 0


def _show(r: dict[str, Any], args: argparse.Namespace, joiner: Joiner) -> int:
    if args.op and r["op"] != args.op:
        return 0
    # With --image the daemon sends only that image's lines; a kernel-only request
    # (e.g. one no daemon answered) is shown if it is on one of that image's objects.
    if args.image and r["source"] is None and r["object_id"] not in joiner.objects:
        return 0
    print(json.dumps(r) if args.json else table_row(r), flush=True)
    return 1
