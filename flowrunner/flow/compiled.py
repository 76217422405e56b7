"""The flow schema compiled for checking files: the same rules as the published schema
(flow/schema.py builds it from the registries), laid out for jsonschema to check quickly.
`validate`'s start-up is mostly import time and this."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..connections.registry import CONNECTION_TYPES
from ..steps import STEP_TYPES
from .dialect import validator_class
from .fastcheck import surely_valid

_REFERENCE = "#/$defs/reference"  # schema.REFERENCE_BRANCH's target: _any_of there looks for the $ref


class CompiledSchema:
    """The schema's validators. A file is checked in two passes that report what the published
    schema does: its outline, where a step or connection is only checked for its `type`, then each
    step and connection against its own type's definition. The published schema says the same with
    an `if` per type under `allOf`, which jsonschema would try on every step (half of `validate`'s
    time); here the type picks the definition directly. Local `$ref`s are inlined too: jsonschema
    resolves a `$ref` at every use, which cost more than all the rest of checking a flow."""

    def __init__(self, full: dict[str, Any]) -> None:
        self._new = _Lazy  # jsonschema only for a file flow/fastcheck.py cannot pass
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
        if self._surely_valid(validator, data):  # most files: no need for jsonschema's slow walk
            return
        yield from validator.iter_errors(data)
        if not isinstance(data, dict):
            return
        steps, connections = data.get("steps"), data.get("connections")
        sections = [("steps", "step", STEP_TYPES, enumerate(steps) if isinstance(steps, list) else ()),
                    ("connections", "connection", CONNECTION_TYPES,
                     connections.items() if isinstance(connections, dict) else ())]
        for section, kind, registry, items in sections:
            for key, item in items:
                yield from self._item_errors(kind, registry, item, (section, key))

    def _item_errors(self, kind: str, registry: dict[str, Any], item: Any, where: tuple[Any, ...]) -> Iterator[Any]:
        type_name = item.get("type") if isinstance(item, dict) else None
        if not (isinstance(type_name, str) and type_name in registry):
            return
        for error in self._part(f"{kind}.{type_name}").iter_errors(item):
            error.path.extendleft(reversed(where))  # where the item sits in the file
            yield error
        inner = getattr(registry[type_name], "nests", None)  # a parallel group's branches: each by its type too
        if inner and isinstance(item.get(inner), list):
            for index, branch in enumerate(item[inner]):
                yield from self._item_errors(kind, registry, branch, (*where, inner, index))

    def _surely_valid(self, validator: Any, data: Any) -> bool:
        """What iter_errors checks, by flow/fastcheck.py: True only where jsonschema would find nothing."""
        if not surely_valid(validator.schema, data, self._defs):
            return False
        if not isinstance(data, dict):
            return True
        steps, connections = data.get("steps"), data.get("connections")
        return all(self._item_valid(kind, registry, item) for kind, registry, items in (
            ("step", STEP_TYPES, steps if isinstance(steps, list) else ()),
            ("connection", CONNECTION_TYPES, connections.values() if isinstance(connections, dict) else ()))
            for item in items)

    def _item_valid(self, kind: str, registry: dict[str, Any], item: Any) -> bool:
        type_name = item.get("type") if isinstance(item, dict) else None
        if not (isinstance(type_name, str) and type_name in registry):
            return True  # as _item_errors: the outline reports it
        if not surely_valid(self._part(f"{kind}.{type_name}").schema, item, self._defs):
            return False
        inner = getattr(registry[type_name], "nests", None)
        return not (inner and isinstance(item.get(inner), list)) or all(
            self._item_valid(kind, registry, branch) for branch in item[inner])

    def _part(self, name: str) -> Any:
        if name not in self._parts:
            part = _inline(self._defs[name], self._defs, (f"#/$defs/{name}",))
            self._parts[name] = self._new({"$schema": self._dialect, **part, "$defs": self._defs})
        return self._parts[name]


class _Lazy:
    """A schema, and its jsonschema validator built on first use: a file that flow/fastcheck.py passes
    needs none, and importing jsonschema is most of what `validate` would start with (bench/startup.py)."""

    __slots__ = ("schema", "_validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._validator: Any = None

    def iter_errors(self, data: Any) -> Iterator[Any]:
        if self._validator is None:
            self._validator = validator_class()(self.schema)
        return self._validator.iter_errors(data)


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
