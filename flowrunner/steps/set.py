"""`set`: binds variables from values and references."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Outputs, Step

if TYPE_CHECKING:
    from ..events import Event
    from .context import StepContext
    from ..flow.model import StepSpec


class SetStep(Step):
    type_name = "set"
    summary = "Binds each key of `values` as a variable (${greeting}) and as ${steps.ID.greeting}."
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        "values": {
            "type": "object",
            "description": "variables to bind: name -> value (text with ${...}, or any YAML value)",
            "propertyNames": {"$ref": "#/$defs/name"},
            "minProperties": 1,
        }
    }
    required = ("values",)
    example = """\
- id: greet
  type: set
  values:
    greeting: "Hello, ${inputs.name}!"
    shout: ${inputs.loud}
"""

    @classmethod
    def bindings(cls, spec: StepSpec) -> dict[str, str]:
        return {name: name for name in _names(spec)}

    @classmethod
    def declared_outputs(cls, spec: StepSpec) -> tuple[str, ...]:
        return tuple(_names(spec))

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        yield Outputs(dict(ctx.props["values"]))


def _names(spec: StepSpec) -> list[str]:
    """The names `values` binds; none when it is not a mapping (the schema reports that)."""
    values = spec.props.get("values")
    return [k for k in values if isinstance(k, str)] if isinstance(values, dict) else []
