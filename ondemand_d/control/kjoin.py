# SPDX-License-Identifier: Apache-2.0
"""The join of `ondemand-d trace --kernel`, free of I/O: trace_pipe lines of the kernel's
cachefiles_ondemand_* tracepoints and the daemon's request lines in, one row per request out.

The tracepoints (include/trace/events/cachefiles.h, Linux 6.3+) print hex fields, fd in
decimal:

    cachefiles_ondemand_open:       o=<debug id> mid=<msg_id> oid=<object_id> fd=<fd> f=<flags>
                                    (mid=0 oid=0 on 6.8+)
    cachefiles_ondemand_copen:      o=<debug id> mid=<msg_id> l=<size>
    cachefiles_ondemand_read:       o=<debug id> mid=0 oid=<object_id, 0 on 6.8+> s=<off> l=<len>
    cachefiles_ondemand_fd_write:   o=<debug id> iB=<backing inode> s=<pos> l=<len>
    cachefiles_ondemand_cread:      o=<debug id> mid=<msg_id>    (the daemon completed the READ)
    cachefiles_ondemand_close:      o=<debug id> mid=0 oid=<object_id, 0 on 6.8+>
    cachefiles_ondemand_fd_release: o=<debug id> oid=<object_id>

`read` and `close` fire in cachefiles_ondemand_send_req's init_req, before xa_alloc gives
the request its msg_id (mid=0 on every kernel) and, since 6.8, before the daemon's read of
the request fills its object_id in (oid=0); 6.8+ traces `open` in that read before it fills
in either. So these three wait per debug id (`o=`), in arrival order, to be claimed: copen
and cread tie a msg_id to a debug id, the daemon's line a msg_id to an object id and range,
and the two together (or 6.3-6.7's oid, or fd_release) an object id to a debug id. A request
takes the earliest unclaimed event of its op on its debug id (a READ: s == off, l == len)
traced before its completion; a READ logged but not completed (read_hung) finds its debug
id through its object id. An event nothing claims within JOIN_WAIT is shown as pending
(a `read`: its debug id, range and time queued so far, and no msg_id).

The tracepoints run on CLOCK_MONOTONIC (ktrace.py sets it), the clock of the daemon's
`mono` field, so a READ's row splits its time into: queued in the
kernel until the daemon took it, fetch and verify until its first write into the cache
file, write and completion, and the total the reader waited.
"""
from __future__ import annotations

import bisect
import contextlib
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_LINE = re.compile(r"(?P<ts>\d+\.\d+):\s+cachefiles_ondemand_(?P<event>\w+):\s+(?P<args>.*)$")
DECIMAL_FIELDS = {"fd"}
#: How long a request waits for its other half before its row is printed as it is.
JOIN_WAIT = 2.0
#: Traced before the request has its msg_id (mid=0): joined by debug id instead.
UNKEYED = ("read", "open", "close")
#: Each event's op.
KERNEL_OPS = {"read": "READ", "cread": "READ", "open": "OPEN", "copen": "OPEN", "close": "CLOSE"}
#: Events shown as pending and still unclaimed that are kept per object, for a late claim.
KEEP_SHOWN = 256
#: fd_write events kept per object (the first write of a READ is a recent one).
WRITES_KEPT = 1024



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


@dataclass
class Request:
    """One request being joined: its kernel events by name, the daemon's line, its object."""

    msg_id: int | None  # None: a read/open/close event nothing has claimed yet
    seen: float  # CLOCK_MONOTONIC of its latest event; JOIN_WAIT counts from there
    kernel: dict[str, dict[str, Any]] = field(default_factory=dict)  # event -> fields
    daemon: dict[str, Any] | None = None
    debug_id: int | None = None
    shown: bool = False  # an unclaimed event already printed as pending

    @property
    def op(self) -> str:
        if self.daemon is not None and self.daemon.get("op"):
            return str(self.daemon["op"])
        return next((op for name, op in KERNEL_OPS.items() if name in self.kernel), "?")

    def complete(self) -> bool:
        d, k = self.daemon, self.kernel
        if d is None:
            return False
        if d.get("op") == "READ":
            return "outcome" in d and "read" in k and "cread" in k
        if d.get("op") == "OPEN":
            return "open" in k and ("copen" in k or d.get("outcome") != "ok")
        return "close" in k


class Joiner:
    """Pairs kernel events and daemon lines into requests; hands out finished ones.

    Fed parsed trace events (`kernel`) and daemon lines (`daemon`), asked for rows with
    `ready(now)`; no I/O, and every time is CLOCK_MONOTONIC seconds.
    """

    def __init__(self) -> None:
        self.pending: dict[int, Request] = {}  # msg_id -> request
        # debug id -> read/open/close events no request has claimed, oldest first
        self.unclaimed: dict[int, list[Request]] = {}
        self.retired: list[Request] = []  # finished before ready(): their msg_id came again
        self.writes: dict[int, deque[dict[str, Any]]] = {}  # debug id -> fd_write events
        self.debug_ids: dict[int, int] = {}  # object_id -> debug id
        self.object_ids: dict[int, int] = {}  # debug id -> object_id
        self.objects: set[Any] = set()  # object ids the daemon's lines named
        self.clock = 0.0  # the latest timestamp seen, for lines without `mono`

    def kernel(self, ev: dict[str, Any]) -> None:
        name, o = ev["event"], ev.get("o", 0)
        self.clock = max(self.clock, ev["ts"])
        if ev.get("oid"):  # 0 where the kernel had not set it yet
            self._map(o, ev["oid"])
        if name == "fd_write":
            self.writes.setdefault(o, deque(maxlen=WRITES_KEPT)).append(ev)
        elif name in UNKEYED:
            self.unclaimed.setdefault(o, []).append(
                Request(None, ev["ts"], {name: ev}, debug_id=o))
            for req in list(self.pending.values()):  # a line that came before this event
                self._claim(req)
        elif name in ("copen", "cread"):
            req = self._request(int(ev["mid"]), ev["ts"], name)
            req.kernel[name] = ev
            if req.debug_id not in (None, o):  # claimed through a stale object id
                self._give_back(req, shown=False)
            req.debug_id = o
            self._settle(req)

    def daemon(self, line: dict[str, Any]) -> None:
        op = line.get("op")
        if op in ("OPEN", "READ", "CLOSE") and "msg_id" in line:
            self.objects.add(line.get("object_id"))
            req = self._request(int(line["msg_id"]), line.get("mono", self.clock), op)
            req.daemon = line  # the latest: after read_hung, or a restarted daemon's
            self._settle(req)

    def _request(self, msg_id: int, ts: float, what: str) -> Request:
        req = self.pending.get(msg_id)
        if req is not None and self._came_again(req, what):
            self.retired.append(self.pending.pop(msg_id))
            req = None
        if req is None:
            req = self.pending[msg_id] = Request(msg_id, ts)
        req.seen = max(req.seen, ts)
        return req

    @staticmethod
    def _came_again(req: Request, what: str) -> bool:
        """Whether `what` (a copen/cread, or a line's op) starts a new request on req's msg_id
        (a cache bound anew, by a daemon restarted without restore, numbers from 0 again)."""
        if req.complete() or what in req.kernel or req.op not in ("?", KERNEL_OPS.get(what, what)):
            return True
        d = req.daemon
        return (what not in KERNEL_OPS and d is not None and "outcome" in d
                and ("cread" in req.kernel or "copen" in req.kernel))

    def _map(self, o: int, oid: int) -> None:
        self.debug_ids[oid], self.object_ids[o] = o, oid

    def _settle(self, req: Request) -> None:
        oid = (req.daemon or {}).get("object_id")
        if req.debug_id is not None and oid:
            # copen/cread + the daemon's line: on 6.8+ the only tie of a debug id to its
            # object id before fd_release (open, read and close print oid=0 there).
            self._map(req.debug_id, oid)
        self._claim(req)

    def _claim(self, req: Request) -> None:
        """Give `req` the earliest unclaimed event of its op, debug id (and range) traced
        before its completion, or its line if not completed; the debug id is the
        completion's, else its object id's."""
        d = req.daemon
        name = str((d or {}).get("op", "")).lower()
        if d is None or name not in UNKEYED or name in req.kernel:
            return
        o = req.debug_id
        if o is None:
            o = self.debug_ids.get(int(d.get("object_id") or 0))
        if o is None:
            return
        done = req.kernel.get("cread") or req.kernel.get("copen")
        # Not a later request's event (a read_hung line must not take a new read of its range).
        before = done["ts"] if done is not None else d.get("mono", float("inf"))
        events = self.unclaimed.get(o, [])
        for i, cand in enumerate(events):
            ev = cand.kernel.get(name)
            if ev is None or ev["ts"] > before:
                continue
            if name == "read" and (ev.get("s"), ev.get("l")) != (d.get("off"), d.get("len")):
                continue
            del events[i]
            req.kernel[name], req.debug_id = ev, o
            return

    def ready(self, now: float, flush: bool = False) -> Iterator[dict[str, Any]]:
        """The rows of finished requests, of those that waited JOIN_WAIT for their other
        half, and of kernel events nothing claimed in that time (all of them if `flush`)."""
        done, self.retired = self.retired, []
        for msg_id, req in sorted(self.pending.items()):
            if flush or req.complete() or now - req.seen > JOIN_WAIT:
                del self.pending[msg_id]
                done.append(req)
        rows = []
        for req in done:
            rows.append(self.joined(req, now))
            if not req.complete():
                # Shown before it completed (a held or hung READ): its kernel event stays
                # claimable, so the completion's row still gets the queued time.
                self._give_back(req, shown=True)
        waited = [req for reqs in self.unclaimed.values() for req in reqs
                  if not req.shown and (flush or now - req.seen > JOIN_WAIT)]
        for req in sorted(waited, key=lambda r: r.seen):
            req.shown = True
            rows.append(self.joined(req, now))
        self._trim()
        yield from rows

    def _give_back(self, req: Request, *, shown: bool) -> None:
        """Return the events `req` claimed to the unclaimed ones of their object."""
        for name in UNKEYED:
            ev = req.kernel.pop(name, None)
            if ev is not None:
                back = Request(None, ev["ts"], {name: ev}, debug_id=ev.get("o", 0), shown=shown)
                bisect.insort(self.unclaimed.setdefault(back.debug_id or 0, []), back,
                              key=lambda r: r.seen)

    def _trim(self) -> None:
        """Forget events shown as pending beyond KEEP_SHOWN per object, oldest first (with
        --image, other images' requests are never claimed)."""
        for o, reqs in list(self.unclaimed.items()):
            shown = [r for r in reqs if r.shown]
            if len(shown) > KEEP_SHOWN:
                drop = {id(r) for r in shown[: len(shown) - KEEP_SHOWN]}
                reqs[:] = [r for r in reqs if id(r) not in drop]
            if not reqs:
                del self.unclaimed[o]

    def joined(self, req: Request, now: float) -> dict[str, Any]:
        """One row: ids, range, the kernel's timestamps turned into phases (ms)."""
        k, d = req.kernel, req.daemon or {}
        first = k.get("read") or k.get("open") or k.get("close") or {}
        o = req.debug_id
        row: dict[str, Any] = {
            "op": req.op, "msg_id": req.msg_id,
            "object_id": d.get("object_id") or first.get("oid") or self.object_ids.get(o or 0),
            "debug_id": o, "off": d.get("off", first.get("s")),
            "len": d.get("len", first.get("l")), "key": d.get("key"),
            "source": d.get("source"), "chunks": d.get("chunks"),
            "outcome": d.get("outcome") or (
                "?" if "cread" in k or "copen" in k else "pending"),
            "kernel_events": sorted(k),
        }
        start = first.get("ts")
        if row["op"] == "READ":
            end = k.get("cread", {}).get("ts")
            taken = _taken(d)
            write = self._first_write(o, row["off"], taken or start, end)
            # Nobody has taken it, as far as the trace knows: queued until now.
            row["queued_ms"] = _ms(start, now if not d and end is None else taken)
            row["fetch_ms"] = _ms(taken, write)
            row["write_ms"] = _ms(write, end)
            row["total_ms"] = _ms(start, end)
        elif row["op"] == "OPEN":
            row["total_ms"] = _ms(start, k.get("copen", {}).get("ts"))
            row["size"] = k.get("copen", {}).get("l")
        row["daemon_ms"] = d.get("duration_ms")
        return row

    def _first_write(self, o: int | None, off: int | None, after: float | None,
                     before: float | None) -> float | None:
        if o is None or off is None:
            return None
        for w in self.writes.get(o, ()):
            if after is not None and w["ts"] < after:
                continue
            if before is not None and w["ts"] > before:
                break
            if w.get("s", 0) <= off < w.get("s", 0) + w.get("l", 0):
                return float(w["ts"])
        return None


def _taken(line: dict[str, Any]) -> float | None:
    """When the daemon took the request: its line's time less its duration, or its age
    (read_hung, which has no duration yet)."""
    if "mono" not in line:
        return None
    took = line.get("duration_ms")
    if took is not None:
        return float(line["mono"]) - float(took) / 1000
    if line.get("age_s") is not None:
        return float(line["mono"]) - float(line["age_s"])
    return None


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 3)


HEADER = (f"{'op':5} {'msg':>6} {'obj':>5} {'dbg':>5} {'off':>10} {'len':>8} {'queued':>8} "
          f"{'fetch':>8} {'write':>8} {'total':>8} {'source':7} {'outcome':8} kernel events")


def table_row(r: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    # dbg: the object's debug id in hex, as the kernel's o= prints it (a READ nobody took
    # has no msg_id, and on 6.8+ often no object id, to show instead).
    dbg = "" if r["debug_id"] is None else f"{r['debug_id']:x}"
    return (f"{r['op']:5} {cell(r['msg_id']):>6} {cell(r['object_id']):>5} {dbg:>5} "
            f"{cell(r['off']):>10} {cell(r['len']):>8} {cell(r.get('queued_ms')):>8} "
            f"{cell(r.get('fetch_ms')):>8} {cell(r.get('write_ms')):>8} "
            f"{cell(r.get('total_ms')):>8} {cell(r['source']):7} {r['outcome']:8} "
            f"{','.join(r['kernel_events'])}")
