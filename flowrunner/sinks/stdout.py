"""Text deltas to stdout, each written and flushed the moment it arrives."""

from __future__ import annotations

import sys
from typing import TextIO

from .. import console
from ..events import Event, StepFinished, TextDelta
from .guard import guarded


class StdoutSink:
    uses_stdout = True

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = guarded(stream or sys.stdout, "stdout")  # a full disk or a closed pipe: a clear error
        self.wrote_text = False
        self.text_step: str | None = None  # the step whose text was written last

    def handle(self, event: Event) -> None:
        if type(event) is TextDelta:
            if event.text:
                self.stream.write(event.text)
                self.stream.flush()
                console.wrote(self.stream, event.text)
                self.wrote_text = True
                self.text_step = event.step
        elif type(event) is StepFinished and event.step == self.text_step:
            # End a streamed answer with a newline, so the shell prompt does not follow it on one line;
            # only when its own step ends: a parallel branch that ends meanwhile must not break the line.
            console.end_line(self.stream)

    @property
    def stdout_taken(self) -> bool:
        return self.wrote_text

    def close(self, interrupted: bool = False) -> None:
        console.end_line(self.stream)
        self.stream.flush()
