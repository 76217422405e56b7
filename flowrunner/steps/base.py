"""The step contract. A step type is one small class in one module: its name, the JSON Schema of its
properties, the outputs it declares, and `run`, which yields events and ends with its outputs.
The engine owns ordering, the variable context, timeouts, retries and events; steps own their I/O."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..events import Event
    from .context import StepContext
    from ..errors import Problem
    from ..flow.model import Flow, StepSpec

REFERENCE = {"$ref": "#/$defs/reference"}


def ref_or(schema: dict[str, Any]) -> dict[str, Any]:
    """A property that takes `schema`, or a ${...} reference resolved at run time."""
    return {"anyOf": [schema, REFERENCE]}


@dataclass(frozen=True, eq=False)
class Outputs:
    """The last item a step yields: its outputs by name."""

    values: Mapping[str, Any]


class Step(ABC):
    type_name: ClassVar[str]
    summary: ClassVar[str]
    properties: ClassVar[dict[str, dict[str, Any]]] = {}
    required: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[dict[str, str]] = {}  # output name -> what it holds
    # Outputs that may be null although the step succeeded (a server that sends no usage): a reference
    # into one of them reads as null with a warning, instead of failing the run (refs.Scope.optional).
    optional_outputs: ClassVar[frozenset[str]] = frozenset()
    result_default: ClassVar[str | None] = None  # variable bound by `result:`; None: no result
    result_output: ClassVar[str] = "text"  # which output the result variable gets
    connection_types: ClassVar[tuple[str, ...]] = ()  # what `connection:` may name
    connection_default: ClassVar[str] = ""  # what a step that may omit `connection:` uses then
    example: ClassVar[str] = ""
    # A property that holds steps (parallel's `steps`): the loader builds it into nested StepSpecs
    # (spec.nested) instead of compiling it as a value.
    nests: ClassVar[str | None] = None

    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec

    @classmethod
    def schema(cls) -> dict[str, Any]:
        props = dict(cls.properties)
        if cls.result_default is not None and "result" not in props:  # a step may describe its own
            props["result"] = {
                "$ref": "#/$defs/name",
                "description": f"variable that receives the {cls.result_output} (default '{cls.result_default}')",
            }
        return {"properties": props, "required": list(cls.required)}

    @classmethod
    def connections_used(cls, spec: StepSpec, run: Any) -> list[str]:
        """The connections, named in the flow, that this step opens in `run` (a RunView, or what
        engine.check_connections passes: its llm_mode and client_history): their environment
        variables are checked once, before the first run. Override when a mode (a replay,
        `serve`'s client history) opens fewer; a name from a ${...} reference is checked when used."""
        name = spec.props.get("connection")
        return [name] if cls.connection_types and isinstance(name, str) else []

    @classmethod
    def bindings(cls, spec: StepSpec) -> dict[str, str]:
        """Variables this step binds: variable name -> output name."""
        if cls.result_default is None:
            return {}
        return {str(spec.props.get("result") or cls.result_default): cls.result_output}

    @classmethod
    def declared_outputs(cls, spec: StepSpec) -> tuple[str, ...]:
        return tuple(cls.outputs)

    @classmethod
    def output_shape(cls, spec: StepSpec, output: str, flow: Any) -> dict[str, Any] | None:
        """A JSON Schema of what `output` holds, when the step knows it at load time (the chat step's
        `json` under an output schema): a reference into it (`${steps.ID.OUTPUT.field}`, or through the
        `result` variable) must then name fields the schema declares (flow/shapes.py). `flow`: what
        check() gets. None: not known; paths inside it are checked only at run time."""
        return None

    @classmethod
    def streams(cls, spec: StepSpec) -> bool:
        """True when the step may send text to the sink (TextDelta): a parallel group allows one such
        branch, so that two answers never interleave. Override in a step type that streams."""
        return False

    @classmethod
    def check(cls, spec: StepSpec, flow: Flow) -> list[Problem]:
        """Checks beyond the schema that need the whole flow; override when a type has them."""
        return []

    @abstractmethod
    def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        """An async generator: yield events as they happen, then Outputs last."""
