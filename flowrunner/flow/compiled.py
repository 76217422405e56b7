"""The flow schema compiled for checking files: the same rules as the published schema
(flow/schema.py builds it from the registries), laid out for jsonschema to check quickly.
`validate`'s start-up is mostly import time and this."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..connections.registry import CONNECTION_TYPES
from ..steps import STEP_TYPES
from .dialect import validator_class

_REFERENCE = "#/$defs/reference"  # schema.REFERENCE_BRANCH's target: _any_of there looks for the $ref


class CompiledSchema:
    """The schema's validators. A file is checked in two passes that report what the published
    schema does: its outline, where a step or connection is only checked for its `type`, then each
    step and connection against its own type's definition. The published schema says the same with
    an `if` per type under `allOf`, which jsonschema would try on every step (half of `validate`'s
    time); here the type picks the definition directly. Local `$ref`s are inlined too: jsonschema
    resolves a `$ref` at every use, which cost more than all the rest of checking a flow."""

    def __init__(self, full: dict[str, Any]) -> None:
        self._new = validator_class()
        self._dialect = full["$schema"]
        self._defs = {**full["$defs"], **{kind: {k: v for k, v in full["$defs"][kind].items() if k != "allOf"}
                                           for kind in ("step", "connection")}}
        top = _inline({k: v for k, v in full.items() if k != "$defs"}, self._defs, ())
        self.flow = self._new({**top, "$defs": self._defs})
        self.connections_file = self._new({
            "$schema": self._dialect, "type": "object", "additionalProperties": False,
            "required": ["connections"], "properties": {"connections": top["properties"]["connections"]},
            "$defs": self._defs,
        })
        self._parts: dict[str, Any] = {}

    def iter_errors(self, validator: Any, data: Any) -> Iterator[Any]:
        yield from validator.iter_errors(data)
        if not isinstance(data, dict):
            return
        steps, connections = data.get("steps"), data.get("connections")
        sections = [("steps", "step", STEP_TYPES, enumerate(steps) if isinstance(steps, list) else ()),
                    ("connections", "connection", CONNECTION_TYPES,
                     connections.items() if isinstance(connections, dict) else ())]
        for section, kind, registry, items in sections:
            for key, item in items:
                type_name = item.get("type") if isinstance(item, dict) else None
                if isinstance(type_name, str) and type_name in registry:
                    for error in self._part(f"{kind}.{type_name}").iter_errors(item):
                        error.path.extendleft((key, section))  # where the item sits in the file
                        yield error

    def _part(self, name: str) -> Any:
        if name not in self._parts:
            part = _inline(self._defs[name], self._defs, (f"#/$defs/{name}",))
            self._parts[name] = self._new({"$schema": self._dialect, **part, "$defs": self._defs})
        return self._parts[name]


_ANNOTATIONS = frozenset({"$ref", "description", "title", "default", "examples"})
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    """`node` with each local `$ref` (beside annotations only) replaced by its definition. Kept as
    `$ref`s: the reference branch (_any_of looks for it; it is tried only for a ${...} value) and a
    definition's reference to itself (a recursive schema)."""
    if isinstance(node, list):
        return [_inline(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if (isinstance(ref, str) and ref.startswith("#/$defs/") and ref != _REFERENCE
            and ref not in seen and node.keys() <= _ANNOTATIONS and isinstance(defs.get(ref[8:]), dict)):
        annotations = {k: v for k, v in node.items() if k != "$ref"}
        return {**_inline(defs[ref[8:]], defs, (*seen, ref)), **annotations}
    return {k: v if k in _DATA_KEYWORDS else _inline(v, defs, seen) for k, v in node.items()}
