# SPDX-License-Identifier: Apache-2.0
"""structlog set-up: JSON lines off a TTY (systemd, files), readable on a TTY."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]
#: Called with (method_name, event_dict) for every line at info and above, whatever the
#: configured level: the control socket's counters and `trace` are built from them.
Observer = Callable[[str, MutableMapping[str, Any]], None]
_observers: list[Observer] = []


def ms_since(start: float) -> float:
    """Milliseconds since `start` (a `time.perf_counter()`), as log lines' `duration_ms`."""
    return round((time.perf_counter() - start) * 1000, 3)


def observe(observer: Observer) -> None:
    """Call `observer` for each log line from now on (see `configure(observe=True)`)."""
    _observers.append(observer)


def unobserve(observer: Observer) -> None:
    if observer in _observers:
        _observers.remove(observer)


def _dispatch(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    for observer in _observers:
        observer(method, event)
    return event


def _drop_below(level: int) -> Callable[[Any, str, MutableMapping[str, Any]], Any]:
    levels = logging.getLevelNamesMapping()

    def drop(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        if levels.get(method.upper(), logging.INFO) < level:
            raise structlog.DropEvent
        return event
    return drop


class _Std:
    """sys.stdout or sys.stderr as they are at each write, not at configure time.

    Loggers are cached on first use; a cached logger must not keep writing to
    a stream that was replaced (and closed) since, e.g. by a test runner.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return int(getattr(sys, self.name).write(text))

    def flush(self) -> None:
        getattr(sys, self.name).flush()

    def isatty(self) -> bool:
        return bool(getattr(sys, self.name).isatty())


def configure(
    fmt: LogFormat = "auto", level: str = "info", *, stream: str = "stdout", cache: bool = True,
    observe: bool = False,
) -> None:
    """Configure structlog once for the process.

    Args:
        fmt: "json", "console", or "auto" (console on a TTY, else JSON).
        level: "debug", "info", "warning" or "error"; debug shows each step of a READ.
        stream: "stdout" (the daemon's log) or "stderr" (commands whose stdout is a result).
        cache: cache each logger on first use (the daemon's hot path); short
            commands skip it so a later configuration still applies.
        observe: pass info lines and above to the observers even when `level` hides them
            (the daemon's counters must not depend on its log level).
    """
    out = _Std(stream)
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    try:
        numeric = logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        msg = f"unknown log level {level!r} (use debug, info, warning or error)"
        raise ValueError(msg) from None
    processors: list[structlog.types.Processor] = [structlog.contextvars.merge_contextvars]
    if observe:
        processors.append(_dispatch)
        if numeric > logging.INFO:
            processors.append(_drop_below(numeric))
            numeric = logging.INFO
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=cache,
    )
