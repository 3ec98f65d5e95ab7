# SPDX-License-Identifier: Apache-2.0
"""What the fanotify front end did, counted where it happens (not read back from its log).

The per-event log line of an already-filled range is at debug level (it is most of
them), so the counters, `/metrics`, STATUS= and `trace` must not depend on the log.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

#: The `source` of an event whose range was already in the file: allowed at once.
ALREADY_FILLED = "filled"


@dataclass
class EventCounters:
    """Events read from the group and how each was answered (loop thread only)."""

    events: int = 0  # every event read, overflows included
    orphans: int = 0  # a dead instance's events answered at start
    #: (source, outcome) -> answered events; source is "filled", "local", "remote", ...
    answers: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    bytes_by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # error_type

    def answered(self, source: str, outcome: str, written: int, error_type: str = "") -> None:
        self.answers[source or "none", outcome] += 1
        self.bytes_by_source[source or "none"] += written
        if outcome != "ok":
            self.errors[error_type or "Denied"] += 1

    @property
    def denied(self) -> int:
        return sum(n for (_, outcome), n in self.answers.items() if outcome != "ok")

    @property
    def fills(self) -> int:
        """Events answered after a fill (their range was not all there yet)."""
        return sum(n for (source, outcome), n in self.answers.items()
                   if outcome == "ok" and source != ALREADY_FILLED)

    @property
    def already_filled(self) -> int:
        return self.answers[ALREADY_FILLED, "ok"]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (status); `bytes_read_filled` is what READ answers wrote."""
        return {
            "events": self.events, "already_filled": self.already_filled, "fills": self.fills,
            "denied": self.denied, "orphans": self.orphans,
            "reads": [{"source": s, "outcome": oc, "count": n,
                       "bytes": self.bytes_by_source[s] if oc == "ok" else 0}
                      for (s, oc), n in sorted(self.answers.items())],
            "read_errors": dict(sorted(self.errors.items())),
        }
