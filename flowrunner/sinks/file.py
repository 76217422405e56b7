"""The streamed text to a file, flushed as it arrives so `tail -f` follows the answer."""

from __future__ import annotations

from ..events import Event, TextDelta
from .guard import guarded


class FileSink:
    uses_stdout = False
    stdout_taken = False

    def __init__(self, path: str) -> None:
        self.stream = guarded(open(path, "w", encoding="utf-8"), f"the text file {path}")  # noqa: SIM115

    def handle(self, event: Event) -> None:
        if type(event) is TextDelta and event.text:
            self.stream.write(event.text)
            self.stream.flush()

    def close(self, interrupted: bool = False) -> None:
        self.stream.close()
