# SPDX-License-Identifier: Apache-2.0
"""structlog set-up: JSON lines off a TTY (systemd, files), readable on a TTY."""
from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure(fmt: LogFormat = "auto", level: str = "info", *, stream: object = None) -> None:
    """Configure structlog once for the process.

    Args:
        fmt: "json", "console", or "auto" (console on a TTY, else JSON).
        level: "debug", "info", "warning" or "error"; debug shows each step of a READ.
        stream: where lines go (default stdout).
    """
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    try:
        numeric = logging.getLevelNamesMapping()[level.upper()]
    except KeyError:
        msg = f"unknown log level {level!r} (use debug, info, warning or error)"
        raise ValueError(msg) from None
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
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
        cache_logger_on_first_use=True,
    )
