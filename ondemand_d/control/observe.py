# SPDX-License-Identifier: Apache-2.0
"""Counters, histograms and the live request flow, taken from the daemon's request lines.

The log line of each request (`opened`, `read_completed`, `closed`, `prefilled`,
`read_ahead`) is the daemon's documented record of what it did; counting those lines
keeps the views true to the log, whatever the service's internals look like. They
are seen at every log level (`log.configure(observe=True)`).

The fanotify front end's events are not counted here: it counts them itself
(`fanotify.counters`), because the line of an already-filled range is at debug, and
hands every event's line to `publish` for `trace` at any log level.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

#: READ latency buckets, seconds (Prometheus' `le`): 1 ms to 2 min; the guest runs under
#: TCG, where a READ takes 100 ms, and a stalled registry shows up in the tail.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)
REQUEST_EVENTS = {"opened": "OPEN", "read_completed": "READ", "closed": "CLOSE"}
BACKGROUND_EVENTS = {"prefilled": "prefill", "read_ahead": "readahead"}
#: Lines a trace shows besides the requests (failures and lifecycle).
TRACE_EVENTS = {*REQUEST_EVENTS, *BACKGROUND_EVENTS, "request_ignored", "malformed_message",
                "copen_failed", "complete_failed", "read_hung", "ready", "stopping", "stopped",
                "restore_unsupported", "culled"}
#: Lines only counted (not traced).
COUNTED_EVENTS = {"registry_retry", "chunk_digest_mismatch", "prefetch_failed"}
SUBSCRIBER_QUEUE = 10_000  # lines a slow `trace` client may lag before lines are dropped


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.n += 1


@dataclass(eq=False)  # hashable by identity: kept in a set
class Subscriber:
    """One `trace` client: a bounded queue of lines."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]]
    dropped: int = 0

    def put(self, line: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.dropped += 1


class Observer:
    """Counts request lines and hands them to live subscribers (called from any thread)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()  # op, outcome
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()  # source, outcome
        self.bytes_by_source: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()  # READ error_type
        #: (frontend, kind, outcome) and (frontend, kind)
        self.background: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.background_bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.read_latency = Histogram()
        self.hung_reads = 0
        self.fetch_retries = 0
        self.fetch_mismatches = 0
        self.prefetch_failures = 0
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()

    def __call__(self, _method: str, event: MutableMapping[str, Any]) -> None:
        name = event.get("event")
        if name == "read_completed" and event.get("frontend") == "fanotify":
            return  # counted by the front end and published by it (`publish`)
        if name not in TRACE_EVENTS:
            if name in COUNTED_EVENTS:
                with self._lock:
                    self._count(str(name), event)
            return
        with self._lock:
            self._count(str(name), event)
        self.publish(event)

    def publish(self, event: MutableMapping[str, Any]) -> None:
        """Hand a request line to the live subscribers (`trace`), without counting it."""
        if self._subscribers:
            line = {k: v for k, v in event.items() if not k.startswith("_")}
            # mono: CLOCK_MONOTONIC, the clock `trace --kernel` sets for the tracepoints.
            line["ts"], line["mono"] = time.time(), time.monotonic()
            for sub in list(self._subscribers):
                sub.loop.call_soon_threadsafe(sub.put, line)

    def _count(self, name: str, event: MutableMapping[str, Any]) -> None:
        op = REQUEST_EVENTS.get(name)
        if op is not None:
            outcome = str(event.get("outcome", "ok"))
            self.requests[op, outcome] += 1
            if op == "READ":
                source = str(event.get("source") or "none")
                self.reads[source, outcome] += 1
                self.bytes_by_source[source] += int(event.get("bytes") or 0)
                self.read_latency.add(float(event.get("duration_ms") or 0) / 1000)
                if outcome != "ok":
                    self.errors[str(event.get("error_type", "unknown"))] += 1
            return
        kind = BACKGROUND_EVENTS.get(name)
        if kind is not None:
            frontend = str(event.get("frontend") or "fscache")
            self.background[frontend, kind, str(event.get("outcome", "ok"))] += 1
            self.background_bytes[frontend, kind] += int(event.get("bytes") or 0)
        elif name == "read_hung":
            self.hung_reads += 1
        elif name == "registry_retry":
            self.fetch_retries += 1
        elif name == "chunk_digest_mismatch":
            self.fetch_mismatches += 1
        elif name == "prefetch_failed":
            self.prefetch_failures += 1

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE) -> Subscriber:
        sub = Subscriber(asyncio.get_running_loop(), asyncio.Queue(maxsize))
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """End every subscriber's stream (the daemon is stopping)."""
        for sub in list(self._subscribers):
            sub.loop.call_soon_threadsafe(sub.put, {"event": "_end"})

    def histogram(self) -> Histogram:
        with self._lock:
            h = self.read_latency
            return Histogram(h.buckets, list(h.counts), h.total, h.n)

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON values."""
        with self._lock:
            return {
                "requests": [{"op": op, "outcome": oc, "count": n}
                             for (op, oc), n in sorted(self.requests.items())],
                "reads": [{"source": s, "outcome": oc, "count": n,
                           "bytes": self.bytes_by_source[s] if oc == "ok" else 0}
                          for (s, oc), n in sorted(self.reads.items())],
                "read_errors": dict(sorted(self.errors.items())),
                "background": [{"frontend": f, "kind": k, "outcome": oc, "count": n}
                               for (f, k, oc), n in sorted(self.background.items())],
                "background_bytes": [{"frontend": f, "kind": k, "bytes": n}
                                     for (f, k), n in sorted(self.background_bytes.items())],
                "hung_reads": self.hung_reads,
                "fetch_retries": self.fetch_retries,
                "fetch_mismatches": self.fetch_mismatches,
                "prefetch_failures": self.prefetch_failures,
            }
