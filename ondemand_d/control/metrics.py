# SPDX-License-Identifier: Apache-2.0
"""`GET /metrics`: the daemon's counters in the Prometheus text format (version 0.0.4).

Request, read, byte and error families carry a `frontend` label: `fscache` (the
kernel's cachefiles requests, counted by `observe.Observer`) or `fanotify` (its
pre-content events, counted by the front end itself: `fanotify.counters`).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from ondemand_d.control.observe import Histogram
from ondemand_d.control.server import ControlServer
from ondemand_d.control.status import Runtime, images_now, runtime

#: Not "ondemand_d_": promtool's lint reads "_d_" as an abbreviated unit (days).
PREFIX = "ondemand_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Families in order, each with its HELP and TYPE once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str,
               samples: Iterable[tuple[dict[str, object], float]]) -> None:
        full = PREFIX + name + ("_total" if kind == "counter" else "")
        self.lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
        for labels, value in samples:
            self.lines.append(f"{full}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, text: str, h: Histogram) -> None:
        self.lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} histogram"]
        running = 0
        for bound, count in zip(h.buckets, h.counts, strict=False):
            running += count
            self.lines.append(f'{PREFIX}{name}_bucket{{le="{_number(bound)}"}} {running}')
        self.lines.append(f'{PREFIX}{name}_bucket{{le="+Inf"}} {h.n}')
        self.lines.append(f"{PREFIX}{name}_sum {_number(h.total)}")
        self.lines.append(f"{PREFIX}{name}_count {h.n}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def fscache_runs(rt: Runtime) -> bool:
    """Whether the fscache front end serves (not a host without /dev/cachefiles)."""
    return not getattr(rt.device, "absent", False)


def render(rt: Runtime, cache: list[dict[str, Any]], now: float | None = None,
           fanotify_cache: dict[str, int] | None = None) -> str:
    """The exposition for one scrape; `cache` is status.images() of this moment and
    `fanotify_cache` the fanotify blob files' allocated bytes by domain."""
    obs = rt.observer
    snap = obs.snapshot()
    fan = rt.frontends.get("fanotify")
    fc = fan.counters.as_dict() if fan is not None else {"reads": [], "read_errors": {}}
    fe = {"frontend": "fscache"}
    fa = {"frontend": "fanotify"}
    out = Exposition()
    out.family("info", "gauge", "The daemon's version and kernel release (always 1).",
               [({"version": _version(), "kernel": rt.features.release}, 1)])
    features = [({"feature": k}, int(bool(v))) for k, v in rt.features.as_dict().items()
                if k != "release"] if fscache_runs(rt) else []
    if fan is not None:
        features.append(({"feature": "fanotify_pre_content"}, 1))
    out.family("kernel_feature", "gauge", "Kernel features the running front ends found at "
               "start-up (1 yes, 0 no).", features)
    out.family("uptime_seconds", "gauge", "Seconds since the daemon started.",
               [({}, round((now or time.monotonic()) - rt.started_monotonic, 3))])
    out.family("requests", "counter", "Requests from the kernel answered (fanotify: events), "
               "by front end, op and outcome.",
               [({**fe, "op": r["op"], "outcome": r["outcome"]}, r["count"])
                for r in snap["requests"]]
               + [({**fa, "op": "READ", "outcome": outcome}, n) for outcome, n in
                  _by_outcome(fc["reads"]).items()])
    out.family("reads", "counter", "READs completed, by front end, where the bytes came from "
               "(fanotify: filled, a range already there) and outcome.",
               [({**fe, "source": r["source"], "outcome": r["outcome"]}, r["count"])
                for r in snap["reads"]]
               + [({**fa, "source": r["source"], "outcome": r["outcome"]}, r["count"])
                  for r in fc["reads"]])
    out.family("read_bytes", "counter", "Bytes written into cache files for READs, by front "
               "end and source.",
               [({**fe, "source": r["source"]}, r["bytes"]) for r in snap["reads"]
                if r["outcome"] == "ok"]
               + [({**fa, "source": r["source"]}, r["bytes"]) for r in fc["reads"]
                  if r["outcome"] == "ok"])
    out.histogram("read_duration_seconds", "Time from a READ's arrival to its completion "
                  "(fscache).", obs.histogram())
    out.family("read_errors", "counter", "READs answered with EIO, by front end and error type.",
               [({**fe, "error_type": k}, v) for k, v in snap["read_errors"].items()]
               + [({**fa, "error_type": k}, v) for k, v in fc["read_errors"].items()])
    if fan is not None:
        out.family("events", "counter", "Events read from the front end's queue (fanotify: "
                   "pre-content events, overflows included).", [(fa, fc["events"])])
        out.family("fill_bytes", "counter", "Bytes written into the front end's files "
                   "(fanotify: for events, readahead and mount metadata).",
                   [(fa, fan.filler.bytes_filled)])
        out.family("mounts", "gauge", "Mounts the front end serves.", [(fa, len(fan.mounts))])
    joins = sum(r["count"] for r in snap["reads"] if r["source"] == "joined")
    out.family("single_flight_joins", "counter",
               "READs that waited for another READ's fetch of the same chunk.", [({}, joins)])
    fetch_errors = snap["read_errors"].get("FetchError", 0) + snap["prefetch_failures"]
    out.family("fetch_errors", "counter", "Registry fetches that failed (READs and prefetch).",
               [({}, fetch_errors)])
    out.family("fetch_retries", "counter", "Registry requests retried.",
               [({}, snap["fetch_retries"])])
    out.family("fetch_digest_mismatches", "counter",
               "Chunks from a registry whose bytes did not match their digest.",
               [({}, snap["fetch_mismatches"])])
    out.family("background", "counter", "Prefills and readaheads, by front end, kind and "
               "outcome.",
               [({"frontend": b["frontend"], "kind": b["kind"], "outcome": b["outcome"]},
                 b["count"]) for b in snap["background"]])
    out.family("background_bytes", "counter", "Bytes written without a READ, by front end and "
               "kind.", [({"frontend": b["frontend"], "kind": b["kind"]}, b["bytes"])
                         for b in snap["background_bytes"]])
    out.family("reads_in_flight", "gauge", "READs the kernel is waiting on.",
               [({}, rt.service.objects.reads_in_flight)])
    out.family("stuck_local_reads", "gauge", "I/O threads stuck in a local store read past "
               "local_read_timeout (a hung store).", [({}, rt.service.fetcher.stuck_reads)])
    out.family("hung_reads", "counter", "READs that passed hung_read_after.",
               [({}, snap["hung_reads"])])
    out.family("objects_open", "gauge", "Cache objects (blobs) the kernel holds open.",
               [({}, len(rt.service.objects))])
    out.family("cache_bytes", "gauge", "Bytes the cache files hold: fscache by image (absent "
               "while one cannot be measured: opened before a restart, still held), fanotify "
               "by domain (its blob files' allocated bytes).",
               [({**fe, "image": img["name"]}, img["cached_bytes"]) for img in cache
                if not img["cached_unknown"] and fscache_runs(rt)]
               + [({**fa, "domain": d}, n) for d, n in sorted((fanotify_cache or {}).items())])
    return out.text()


def _by_outcome(reads: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reads:
        out[r["outcome"]] = out.get(r["outcome"], 0) + r["count"]
    return out


def fanotify_cache_bytes(rt: Runtime) -> dict[str, int]:
    """The fanotify blob files' allocated bytes by domain ({} without that front end; I/O)."""
    if rt.frontends.get("fanotify") is None:
        return {}
    from ondemand_d.fanotify import cachelimit, layout  # noqa: PLC0415

    out: dict[str, int] = {}
    for f in cachelimit.scan(layout.root(rt.cfg.cache_dir)):
        out[f.path.parent.name] = out.get(f.path.parent.name, 0) + f.allocated
    return out


def _version() -> str:
    import ondemand_d  # noqa: PLC0415

    return str(ondemand_d.__version__)


async def metrics_view(request: web.Request) -> web.Response:
    rt = runtime(request)
    cache, _ = await images_now(rt)
    fan_cache = await asyncio.get_running_loop().run_in_executor(None, fanotify_cache_bytes, rt)
    return web.Response(body=render(rt, cache, fanotify_cache=fan_cache).encode(),
                        headers={"Content-Type": CONTENT_TYPE})


def add_routes(server: ControlServer) -> None:
    server.add_route("GET", "/metrics", metrics_view)
