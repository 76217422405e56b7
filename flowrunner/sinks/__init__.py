"""Where a run's events go: `stdout` (the text, as it arrives), `jsonl:PATH|-` (every event as one JSON
line), `file:PATH` (the text), `none`."""

from __future__ import annotations

from typing import Protocol

from ..errors import FlowDefinitionError
from ..events import Event


class Sink(Protocol):
    uses_stdout: bool  # writes to stdout at all (so --output json cannot)

    @property
    def stdout_taken(self) -> bool:
        """True once stdout holds what printing the outputs would duplicate or corrupt."""

    def handle(self, event: Event) -> None: ...

    def close(self, interrupted: bool = False) -> None: ...


class NullSink:
    uses_stdout = False
    stdout_taken = False

    def handle(self, event: Event) -> None:
        pass

    def close(self, interrupted: bool = False) -> None:
        pass


def open_sink(spec: str) -> Sink:
    kind, _, arg = spec.partition(":")
    if kind == "stdout" and not arg:
        from .stdout import StdoutSink

        return StdoutSink()
    if kind == "none" and not arg:
        return NullSink()
    if kind in ("jsonl", "file") and arg:
        try:
            if kind == "jsonl":
                from .jsonl import JsonlSink

                return JsonlSink(arg)
            from .file import FileSink

            return FileSink(arg)
        except OSError as e:
            raise FlowDefinitionError.at(f"--sink {spec}: cannot open {arg}: {e.strerror or e}") from None
    raise FlowDefinitionError.at(
        f"--sink {spec!r} is not a sink", hint="use stdout, none, jsonl:PATH, jsonl:- or file:PATH"
    )
