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
    # A for_each step: `items` (how many) on the step's own start, `item` (its index) on each item's.
    item: int | None = None
    items: int | None = None


@dataclass(frozen=True)
class StreamStarted(Event):
    """The model server accepted a streaming request (HTTP 200): text may follow."""

    step: str


@dataclass(frozen=True)
class TextDelta(Event):
    step: str
    text: str


@dataclass(frozen=True)
class ReasoningDelta(Event):
    """A piece of a reasoning model's thinking (`delta.reasoning_content` or `delta.reasoning`): never
    part of the answer's text."""

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
class Fallback(Event):
    """A chat step's own model failed before its answer began, and one of its `fallback:` models answers."""

    step: str
    fallback: int  # its place in the step's `fallback:` list, from 1
    connection: str
    model: str | None
    failed: tuple[Mapping[str, Any], ...] = ()  # each model tried before it, in order: {connection, model, error}


@dataclass(frozen=True)
class StepRetrying(Event):
    step: str
    attempt: int  # the attempt that failed
    error: str
    delay: float
    item: int | None = None  # the for_each item that is retried


@dataclass(frozen=True)
class StepFinished(Event):
    step: str
    status: str  # ok | failed | skipped | cancelled (a parallel branch stopped because another failed)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration: float = 0.0
    reason: str | None = None  # why it was skipped: its `when` did not hold, or an earlier step failed
    # A for_each step: `item` on each item's end; `items` on the step's own end, its outputs the lists.
    item: int | None = None
    items: int | None = None


@dataclass(frozen=True)
class RunFinished(Event):
    run_id: str
    status: str  # ok | failed | interrupted
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration: float = 0.0


def add_usage(total: dict[str, Any], usage: Mapping[str, Any]) -> None:
    """Adds a Usage event's token counts into `total`, nested details too (completion_tokens_details.
    reasoning_tokens, prompt_tokens_details.cached_tokens): one call's usage stays as its server sent it."""
    for key, value in usage.items():
        if type(value) is int:
            total[key] = total.get(key, 0) + value
        elif isinstance(value, Mapping):
            inner = total.get(key)
            if not isinstance(inner, dict):
                inner = total[key] = {}
            add_usage(inner, value)


_KINDS: dict[type, str] = {
    RunStarted: "run_started",
    StepStarted: "step_started",
    StreamStarted: "stream_started",
    TextDelta: "text",
    ReasoningDelta: "reasoning",
    Progress: "progress",
    Usage: "usage",
    Warning: "warning",
    Fallback: "fallback",
    StepRetrying: "step_retrying",
    StepFinished: "step_finished",
    RunFinished: "run_finished",
}
