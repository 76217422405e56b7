"""structlog, configured once by the CLI: console lines when stderr is a terminal, JSON lines
otherwise (cron, CI, containers). Every record passes the secret redactor."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from . import secrets


def _redact(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return secrets.redact_value(event_dict)


def _drop_run_chatter(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if method in ("debug", "info") and "run_id" in event_dict:
        raise structlog.DropEvent
    return event_dict


def configure(fmt: str | None = None, level: str | None = None, *, quiet_runs: bool = False) -> None:
    """fmt: console | json (default: console on a terminal). level: debug | info | warning | error
    (default: info for machines, warning on a terminal so logs do not interleave with the answer).
    quiet_runs: drop the info lines from inside each run (a batch logs one line per item instead)."""
    tty = sys.stderr.isatty()
    fmt = fmt or ("console" if tty else "json")
    level = level or ("warning" if tty else "info")
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=tty) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([_drop_run_chatter] if quiet_runs else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
