"""The loaded flow: frozen dataclasses built from validated YAML. Strings that hold references are
already parsed into refs.Template objects.

eq=False: each spec is one object of one loaded flow, compared by identity; generating __eq__ and
__hash__ for them is start-up time `validate` pays for nothing (bench/startup.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import Location
from .load import PathKey, SourceMap

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

    @property
    def path(self) -> PathKey:
        return ("steps", self.index)

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

    def step(self, step_id: str) -> StepSpec:
        for spec in self.steps:
            if spec.id == step_id:
                return spec
        raise KeyError(step_id)


def frozen(mapping: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(mapping)
