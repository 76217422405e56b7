"""Text deltas to stdout, each written and flushed the moment it arrives."""

from __future__ import annotations

import sys
from typing import TextIO

from ..events import Event, StepFinished, TextDelta


class StdoutSink:
    uses_stdout = True

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.wrote_text = False
        self._last = "\n"

    def handle(self, event: Event) -> None:
        if type(event) is TextDelta:
            if event.text:
                self.stream.write(event.text)
                self.stream.flush()
                self._last = event.text[-1]
                self.wrote_text = True
        elif type(event) is StepFinished and self._last != "\n":
            # End a streamed answer with a newline, so the shell prompt does not follow it on one line.
            self.stream.write("\n")
            self.stream.flush()
            self._last = "\n"

    @property
    def stdout_taken(self) -> bool:
        return self.wrote_text

    def close(self, interrupted: bool = False) -> None:
        if self._last != "\n":
            self.stream.write("\n")
        self.stream.flush()
