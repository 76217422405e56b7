"""`--show-reasoning`: a reasoning model's thinking on stderr, as it arrives, while the answer goes
to its sink as before (stdout stays the answer alone, so `> answer.txt` never holds the thinking).

On a terminal the thinking is dimmed (ANSI faint; not with NO_COLOR set) so the answer stands out
below it; elsewhere (`2> thinking.txt`, a CI log) it is plain text. Each reasoning passage ends
with a newline before anything else is shown, so the answer starts on a line of its own."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from .. import console
from ..events import Event, ReasoningDelta
from . import Sink

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReasoningView:
    """Wraps the run's sink: ReasoningDelta events go to stderr, every event to the sink."""

    def __init__(self, sink: Sink, stream: TextIO | None = None) -> None:
        self.sink = sink
        self.uses_stdout = sink.uses_stdout
        self.stream = stream or sys.stderr
        self.dim = _is_terminal(self.stream) and not os.environ.get("NO_COLOR")
        self.open = False  # a passage of thinking is on screen, its line not ended yet

    @property
    def stdout_taken(self) -> bool:
        return self.sink.stdout_taken

    def handle(self, event: Event) -> None:
        if type(event) is ReasoningDelta:
            if not self.open:
                console.end_answer_line()  # an earlier step's answer, when stdout shares the terminal
                self.open = True
            self._show(event.text)
        elif self.open:  # the answer (or whatever comes next) starts below the thinking
            self._end()
        self.sink.handle(event)  # the jsonl sink keeps the reasoning events too

    def _show(self, text: str) -> None:
        try:
            self.stream.write(f"{DIM}{text}{RESET}" if self.dim else text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or full: lost, as a log line would be
            return
        console.wrote(self.stream, text)  # a log line written meanwhile starts on a line of its own

    def _end(self) -> None:
        self.open = False
        try:
            console.end_line(self.stream)
        except (OSError, ValueError):
            pass

    def close(self, interrupted: bool = False) -> None:
        if self.open:
            self._end()
        self.sink.close(interrupted)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def show_reasoning(sink: Sink, wanted: bool) -> Sink:
    """The sink itself, or wrapped to show the thinking (only then does a run pay for the wrapper)."""
    return ReasoningView(sink) if wanted else sink
