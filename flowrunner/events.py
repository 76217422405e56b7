"""The one event stream of a run. Sinks, batch, serve and chat all consume these."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class Event:
    @property
    def kind(self) -> str:
        return _KINDS[type(self)]

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class RunStarted(Event):
    run_id: str
    flow: str
    inputs: Mapping[str, Any]


@dataclass(frozen=True)
class StepStarted(Event):
    step: str
    type: str
    title: str | None = None
    attempt: int = 1


@dataclass(frozen=True)
class StreamStarted(Event):
    """The model server accepted a streaming request (HTTP 200): text may follow."""

    step: str


@dataclass(frozen=True)
class TextDelta(Event):
    step: str
    text: str


@dataclass(frozen=True)
class Progress(Event):
    step: str
    done: int
    total: int | None = None
    message: str | None = None


@dataclass(frozen=True)
class Usage(Event):
    step: str
    usage: Mapping[str, Any]


@dataclass(frozen=True)
class Warning(Event):  # noqa: A001 - the event's name on the wire is "warning"
    step: str | None
    message: str


@dataclass(frozen=True)
class StepRetrying(Event):
    step: str
    attempt: int  # the attempt that failed
    error: str
    delay: float


@dataclass(frozen=True)
class StepFinished(Event):
    step: str
    status: str  # ok | failed | skipped
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration: float = 0.0


@dataclass(frozen=True)
class RunFinished(Event):
    run_id: str
    status: str  # ok | failed | interrupted
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration: float = 0.0


def add_usage(total: dict[str, int], usage: Mapping[str, Any]) -> None:
    """Adds a Usage event's token counts into `total` (nested details are left out)."""
    for key, value in usage.items():
        if isinstance(value, int):
            total[key] = total.get(key, 0) + value


_KINDS: dict[type, str] = {
    RunStarted: "run_started",
    StepStarted: "step_started",
    StreamStarted: "stream_started",
    TextDelta: "text",
    Progress: "progress",
    Usage: "usage",
    Warning: "warning",
    StepRetrying: "step_retrying",
    StepFinished: "step_finished",
    RunFinished: "run_finished",
}
