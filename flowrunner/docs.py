"""`flowrunner steps`: the step types and their properties, generated from the registry."""

from __future__ import annotations

from typing import Any

from .errors import FlowDefinitionError, did_you_mean
from .flow.schema import COMMON_STEP_PROPERTIES
from .steps import STEP_TYPES


def list_steps() -> str:
    width = max(len(name) for name in STEP_TYPES)
    lines = [f"{name:<{width}}  {cls.summary}" for name, cls in sorted(STEP_TYPES.items())]
    lines.append("")
    lines.append("flowrunner steps TYPE shows a type's properties, outputs and an example.")
    return "\n".join(lines) + "\n"


def _type_of(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " | ".join(_type_of(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return {"#/$defs/reference": "${ref}", "#/$defs/name": "name", "#/$defs/retry": "retry"}.get(schema["$ref"], "any")
    if "enum" in schema:
        return " | ".join(map(str, schema["enum"]))
    if "const" in schema:
        return str(schema["const"])
    kind = schema.get("type", "any")
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def describe_step(type_name: str) -> str:
    cls = STEP_TYPES.get(type_name)
    if cls is None:
        raise FlowDefinitionError.at(f"'{type_name}' is not a step type",
                                     hint=f"{did_you_mean(type_name, STEP_TYPES) or ''} (flowrunner steps lists them)".strip())
    frag = cls.schema()
    lines = [f"{type_name}: {cls.summary}", ""]
    if cls.connection_types:
        need = "required" if "connection" in cls.required else f"optional; {cls.connection_default}"
        lines.append(f"connection: {' or '.join(cls.connection_types)} ({need})")
        lines.append("")
    lines.append("properties:")
    for name, schema in frag["properties"].items():
        need = "required" if name in frag["required"] else "optional"
        default = f", default {schema['default']!r}" if "default" in schema else ""
        desc = f" - {schema['description']}" if "description" in schema else ""
        lines.append(f"  {name}: {_type_of(schema)} ({need}{default}){desc}")
    lines.append("common to every step: " + ", ".join(k for k in COMMON_STEP_PROPERTIES if k not in ("id", "type")))
    if cls.outputs:
        lines.append("")
        lines.append("outputs (${steps.ID.NAME}):")
        lines += [f"  {name}: {desc}" for name, desc in cls.outputs.items()]
    if cls.example:
        lines += ["", "example:", *("  " + line for line in cls.example.rstrip().splitlines())]
    return "\n".join(lines) + "\n"
