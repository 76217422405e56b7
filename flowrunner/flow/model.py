"""The loaded flow: frozen dataclasses built from validated YAML. Strings that hold references are
already parsed into refs.Template objects.

eq=False: each spec is one object of one loaded flow, compared by identity; generating __eq__ and
__hash__ for them is start-up time `validate` pays for nothing (bench/startup.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Iterable, Iterator
from typing import Any, Mapping

from ..errors import Location, Problem
from .load import PathKey, SourceMap, format_path

INPUT_TYPES = ("string", "integer", "number", "boolean", "array", "object")


@dataclass(frozen=True, eq=False)
class InputSpec:
    """A declared flow input: its type, default and description."""

    name: str
    type: str = "string"
    default: Any = None
    has_default: bool = False
    description: str | None = None
    enum: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return not self.has_default


@dataclass(frozen=True, eq=False)
class ConnectionSpec:
    """A declared connection, its fields still holding ${env.X} templates."""

    name: str
    type: str
    config: Mapping[str, Any]  # values may be Templates of ${env.X}
    path: PathKey = ()
    source: SourceMap | None = field(default=None, repr=False, compare=False)  # the file it came from


@dataclass(frozen=True, eq=False)
class RetrySpec:
    """A step's retry policy: how many tries, and the backoff between them."""

    attempts: int = 1  # total tries, so 1 means no retry
    backoff: float = 1.0  # first delay in seconds, doubled after each try
    max_backoff: float = 30.0


@dataclass(frozen=True, eq=False)
class StepSpec:
    """One step as written: the engine's options, and its type's properties compiled."""

    id: str
    type: str
    index: int
    props: Mapping[str, Any]  # the step-type properties, compiled (Templates inside)
    title: str | None = None
    description: str | None = None
    timeout: Any = None  # seconds, or a Template
    retry: RetrySpec = field(default_factory=RetrySpec)
    run_on_failure: bool = False
    location: Location | None = None
    # Control flow (conditions.py, foreach.py): run only when `when` holds; once per item of `for_each`
    # (a Template or a literal list), `concurrency` items at a time.
    when: Any = None  # a conditions.Condition
    for_each: Any = None
    concurrency: int = 1
    on_item_failure: str = "fail"  # fail | continue
    # Nesting (flow/nested.py): where a parallel group's branch sits (the group's path), and what a
    # step holds: a parallel group its branches (a tuple of StepSpec), a `flow` step its sub-flow (a Flow).
    prefix: PathKey = ()
    nested: Any = None

    @property
    def path(self) -> PathKey:
        return (*self.prefix, "steps", self.index)

    @property
    def path_text(self) -> str:
        """Its path as errors show it: `steps[2]`, a parallel group's branch `steps[0].steps[1]`."""
        return format_path(self.path)

    @property
    def label(self) -> str:
        return f"step '{self.id}' ({self.type})"


@dataclass(frozen=True, eq=False)
class Flow:
    """A loaded, checked flow file."""

    name: str
    version: int
    file: str
    description: str | None
    inputs: Mapping[str, InputSpec]
    connections: Mapping[str, ConnectionSpec]
    steps: tuple[StepSpec, ...]
    outputs: Mapping[str, Any]
    source: SourceMap = field(repr=False, compare=False)
    # What `validate` shows without failing: a step that reads a possibly skipped step's output.
    warnings: tuple[Problem, ...] = ()

    def step(self, step_id: str) -> StepSpec:
        for spec in self.steps:
            if spec.id == step_id:
                return spec
        raise KeyError(step_id)


class Branches(tuple):  # type: ignore[type-arg]
    """A parallel group's branches (StepSpecs), and the id of the one that streams text, if any."""

    streaming: str | None = None


def walk(steps: Iterable[StepSpec], *, into_flows: bool = False) -> Iterator[StepSpec]:
    """Every step, each parallel group followed by its branches (depth first); with into_flows, also
    the steps of sub-flows (what a run opens, whether a flow keeps a history)."""
    for spec in steps:
        yield spec
        if isinstance(spec.nested, tuple):
            yield from walk(spec.nested, into_flows=into_flows)
        elif into_flows and isinstance(spec.nested, Flow):
            yield from walk(spec.nested.steps, into_flows=True)


def frozen(mapping: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(mapping)
