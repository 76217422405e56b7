"""structlog, configured once by the CLI: console lines when stderr is a terminal, JSON lines
otherwise (cron, CI, containers). Every record passes the secret redactor."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog

from . import console, secrets


def _redact(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return secrets.redact_value(event_dict)


def _drop_run_chatter(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # Only lines from inside a run (the engine binds its run_id): a command's own line about a run,
    # which names its run_id itself (serve's `request`), stays.
    if method in ("debug", "info") and "run_id" in structlog.contextvars.get_contextvars():
        raise structlog.DropEvent
    return event_dict


def _drop_printed_errors(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if method == "error" and event_dict.get("event") == "step failed":
        raise structlog.DropEvent
    return event_dict


class _StderrLogger:
    """structlog's PrintLogger, but a line never continues an answer that stdout left unfinished
    on the same terminal or file (see console.py)."""

    _lock = threading.Lock()  # one line at a time, whichever thread logs (the history workers)

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        """Never raises: a log call (from a step, or a history worker thread) must not fail the run
        because stderr is closed or full; the line is lost, as it would be anyway."""
        with self._lock:
            console.end_answer_line()
            try:
                self._file.write(message + "\n")
                self._file.flush()
            except (OSError, ValueError):  # ValueError: stderr is closed
                pass

    log = debug = info = warn = warning = err = error = critical = fatal = exception = msg


def configure(fmt: str | None = None, level: str | None = None, *, quiet_runs: bool = False,
              errors_printed: bool = False) -> None:
    """fmt: console | json (default: console on a terminal). level: debug | info | warning | error
    (default: info for machines, warning on a terminal so logs do not interleave with the answer).
    quiet_runs: drop the info lines from inside each run (a batch logs one line per item instead).
    errors_printed: the command prints each failed step as `Error: ...` (run, chat), so a console,
    which a person reads, does not get the same failure as a log line too; JSON logs keep it."""
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
            *([_drop_printed_errors] if errors_printed and fmt == "console" else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_args: _StderrLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )
