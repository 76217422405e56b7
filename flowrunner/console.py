"""stdout and stderr often reach one place: a terminal, or `> run.log 2>&1`. A streamed answer goes to
stdout with no newline until it ends, so a log line or an error written to stderr meanwhile would
continue the answer's line (`answer{"event": ...`). This module remembers which stream holds an
unfinished line and ends it before anything is written to stderr, but only when both streams reach
the same destination: a newline added to an answer that goes to its own file or pipe would change it."""

from __future__ import annotations

import os
import sys
from typing import TextIO

_open: TextIO | None = None  # the stream whose last line has no newline yet


def wrote(stream: TextIO, text: str) -> None:
    """Note what a sink just wrote to `stream` (and flushed)."""
    global _open
    if text:
        _open = None if text.endswith("\n") else stream


def end_line(stream: TextIO) -> None:
    """End `stream`'s unfinished line, if it has one (an answer ends with a newline)."""
    global _open
    if _open is stream:
        _open = None
        stream.write("\n")
        stream.flush()


def end_answer_line() -> None:
    """Called before writing to stderr: start on a line of its own when stdout shares its destination.
    Never raises: it runs inside every log call (from any thread) and the error printer. When the two
    are one closed pipe (`2>&1 | head`), the newline is lost quietly and not written through the sink's
    guard, which would mark the sink failed; the sink's own next write reports the closed stdout."""
    global _open
    stream = _open
    if stream is None or not _same_destination(stream, sys.stderr):
        return
    _open = None
    raw = getattr(stream, "stream", stream)  # the stream behind a sink's guard (sinks.guard.Guarded)
    try:
        raw.write("\n")
        raw.flush()
    except (OSError, ValueError):  # ValueError: stdout is closed
        pass


def _same_destination(a: TextIO, b: TextIO) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's StringIO), or closed
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
