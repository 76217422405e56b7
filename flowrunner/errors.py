"""The two kinds of error a user can see, and how they print.

A FlowDefinitionError (exit 2) means the flow file or the command line is wrong; it may carry many
problems, because validation collects every mistake in a file at once. A FlowRuntimeError (exit 1)
means a step failed while running.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 130, 141, 143  # 128 + SIGINT, SIGPIPE, SIGTERM


@dataclass(frozen=True)
class Location:
    """A place in a file: file:line:col."""

    file: str
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}:{self.col or 1}"


@dataclass(frozen=True)
class Problem:
    """One mistake in a flow: where it is, which value, what is wrong, and how to fix it."""

    message: str
    location: Location | None = None
    path: str = ""  # e.g. "steps[2].type"
    hint: str | None = None

    def format(self) -> str:
        head = ": ".join(str(part) for part in (self.location, self.path) if part)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, object]:
        loc = self.location
        return {
            "file": loc.file if loc else None,
            "line": loc.line if loc else None,
            "col": loc.col if loc else None,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


class FlowError(Exception):
    exit_code = 1

    def __init__(self, problems: Problem | Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = (
            (problems,) if isinstance(problems, Problem) else tuple(problems)
        )
        super().__init__("\n".join(p.format() for p in self.problems))

    @classmethod
    def at(
        cls,
        message: str,
        location: Location | None = None,
        path: str = "",
        hint: str | None = None,
    ) -> FlowError:
        return cls(Problem(message, location, path, hint))

    @property
    def message(self) -> str:
        return self.problems[0].message


class FlowDefinitionError(FlowError):
    """The flow file, its inputs or the command line is wrong: exit 2."""

    exit_code = 2


class FlowRuntimeError(FlowError):
    """A step failed at run time: exit 1. `http_status` is what `serve` answers a client with."""

    exit_code = 1
    http_status = 500
    http_headers: dict[str, str] | None = None  # `serve` passes these on (the model's Retry-After with a 429)


class StepFailed(FlowRuntimeError):
    """Raised by a step. `outputs` holds what the step produced before it failed (partial text, ...),
    so steps marked run_on_failure can still see it. `retryable` lets the engine try again, but only
    while nothing of the step has reached the sink."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        outputs: dict[str, object] | None = None,
        retryable: bool = False,
        http_status: int = 500,
        http_headers: dict[str, str] | None = None,
        reask: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(Problem(message, hint=hint))
        self.outputs = outputs or {}
        self.retryable = retryable
        # The messages the next attempt adds (StepContext.followup): the step asks again, announced, so
        # the engine's `retry` repeats it even after its text reached the sink.
        self.reask = reask
        self.http_status = http_status
        self.http_headers = http_headers


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest choice, or None when nothing is close."""
    import difflib  # only on the error path: keeps it off every start-up

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None
