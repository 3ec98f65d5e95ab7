# SPDX-License-Identifier: Apache-2.0
"""`ondemand-d trace --kernel`: the kernel's cachefiles_ondemand_* tracepoints, read from a
private tracefs instance on CLOCK_MONOTONIC (the clock of the daemon's `mono` field), joined
to the daemon's request lines (kjoin.py), one row per request as they finish.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ondemand_d.control.kjoin import HEADER, Joiner, parse, table_row
from ondemand_d.errors import OndemandError

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("open", "copen", "read", "fd_write", "cread", "close", "fd_release")


class TraceUnavailable(OndemandError):
    """The kernel's tracepoints cannot be used; the message says why."""


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
