# SPDX-License-Identifier: Apache-2.0
"""`GET /inflight`: every READ the kernel is waiting on, and what it waits for.

Both front ends: fscache READs (`frontend: fscache`) and fanotify events not yet
answered (`frontend: fanotify`, no object id; key DOMAIN/BLOB).

A READ older than `hung_read_after` is flagged as hung, and logged once (`read_hung`).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from ondemand_d.control.server import ControlServer, json_ok
from ondemand_d.control.status import runtime

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger()


def inflight(service: Any, hung_after: float) -> list[dict[str, Any]]:
    """The READs in flight (filling, or waiting for a slot of their source), oldest first.

    Loop thread only.
    """
    now = time.perf_counter()
    rows = []
    for held in service.objects.held():
        job = service.reads.get(held.msg_id)
        obj = service.objects.by_fd(held.fd)
        age = now - held.at
        rows.append({
            "frontend": "fscache", "msg_id": held.msg_id, "object_id": held.object_id,
            "key": obj.cookie_key.decode("utf-8", "backslashreplace") if obj else None,
            "blob": held.blob_id, "off": held.off, "len": held.len,
            "chunks": len(job.chunks) if job is not None else 0, "age_s": round(age, 3),
            "waits_on": job.waits_on if job is not None else "slot",
            "hung": age >= hung_after,
        })
    rows.sort(key=lambda r: -r["age_s"])
    return rows


class HungReads:
    """Logs each READ once when it passes the threshold (call `scan` periodically)."""

    def __init__(self, service: Any, hung_after: float) -> None:
        self.service = service
        self.hung_after = hung_after
        self._logged: set[int] = set()

    def scan(self) -> int:
        rows = [r for r in inflight(self.service, self.hung_after) if r["hung"]]
        for row in rows:
            if row["msg_id"] not in self._logged:
                log.warning("read_hung", op="READ", **row, threshold_s=self.hung_after)
        self._logged = {r["msg_id"] for r in rows}  # forget the finished ones
        return len(rows)


def fanotify_inflight(frontend: Any, hung_after: float) -> list[dict[str, Any]]:
    """The fanotify events waiting for a fill, oldest first (loop thread only)."""
    if frontend is None:
        return []
    now = time.perf_counter()
    rows = []
    for file in list(frontend.files.values()):
        for p in list(file.pending):
            age = now - p.start
            rows.append({
                "frontend": "fanotify", "msg_id": p.seq, "object_id": None,
                "key": f"{file.domain}/{file.blob.blob_id[:12]}", "blob": file.blob.blob_id,
                "off": p.event.offset, "len": p.event.count, "chunks": len(p.chunks),
                "age_s": round(age, 3), "waits_on": "fill", "pid": p.event.pid,
                "hung": age >= hung_after,
            })
    rows.sort(key=lambda r: -r["age_s"])
    return rows


async def inflight_view(request: web.Request) -> web.Response:
    rt = runtime(request)
    rows = inflight(rt.service, rt.cfg.hung_read_after) + fanotify_inflight(
        rt.frontends.get("fanotify"), rt.cfg.hung_read_after)
    rows.sort(key=lambda r: -r["age_s"])
    return json_ok({"hung_after_s": rt.cfg.hung_read_after, "reads": rows,
                    "hung": sum(r["hung"] for r in rows)})


def add_routes(server: ControlServer) -> None:
    server.add_route("GET", "/inflight", inflight_view)
