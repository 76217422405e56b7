"""A sink's stream whose failed writes become errors that name it. Its own module, apart from the
sink registry in __init__.py, so that the sinks import it without importing their package back."""

from __future__ import annotations

import sys
from typing import TextIO, cast


class Guarded:
    """A sink's stream whose failed writes become errors that name it (a full disk: exit 1, "cannot
    write the events file ev.jsonl: No space left on device"; a closed stdout: exit 141, quietly).
    After one failure it writes nothing more, so closing the sink does not fail a second time."""

    def __init__(self, stream: TextIO, where: str) -> None:
        self.stream = stream
        self.where = where  # "stdout", or e.g. "the events file ev.jsonl"
        self.failed = False

    def write(self, text: str) -> None:
        if not self.failed:
            try:
                self.stream.write(text)
            except OSError as e:
                raise self._fail(e) from None

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except OSError as e:
                raise self._fail(e) from None

    def close(self) -> None:
        """Close a file (flushing it: a full disk may only show now); stdout is only flushed."""
        if self.stream is sys.stdout:
            self.flush()
        elif not self.failed:
            try:
                self.stream.close()
            except OSError as e:
                raise self._fail(e) from None

    def fileno(self) -> int:
        return self.stream.fileno()

    def _fail(self, e: OSError) -> Exception:
        from ..files import stdout_failed, write_error

        self.failed = True
        if self.stream is sys.stdout:
            return stdout_failed(e)
        try:  # drop what the buffer still holds: it cannot be written either
            self.stream.close()
        except OSError:
            pass
        return write_error(e, self.where)


def guarded(stream: TextIO, where: str) -> TextIO:
    """`stream` behind a Guarded (it writes, flushes and closes like the stream it wraps)."""
    return cast(TextIO, Guarded(stream, where))
