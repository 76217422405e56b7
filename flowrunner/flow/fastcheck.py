"""A quick yes for a flow that passes its schema: jsonschema spends most of `validate`'s time per file
building a validator per keyword and value (bench/startup.py), to find no error in a valid file.

`surely_valid` answers True only where it is sure jsonschema would find no error; for anything it
does not know exactly (a keyword not below, a float where an integer is wanted, a value of a kind
YAML does not give) it answers False, and the file is checked by jsonschema as before, which then
reports the errors. So it adds speed, never a different verdict or message."""

from __future__ import annotations

from typing import Any

from .dialect import ecma_regex

# Keywords that never make a value invalid (annotations, and the ones resolved elsewhere).
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "$comment", "description", "title", "default", "examples",
                          "deprecated", "readOnly", "writeOnly"})
_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "object": (dict,), "array": (list,), "boolean": (bool,),
                                       "null": (type(None),), "integer": (int,), "number": (int, float)}
_SCALARS = (str, int, float, bool, type(None))


def surely_valid(schema: Any, value: Any, defs: dict[str, Any]) -> bool:
    if schema is True:
        return True
    if not isinstance(schema, dict):
        return False  # `false`, or not a schema: let jsonschema say
    for key, rule in schema.items():
        if key in _ANNOTATIONS:
            continue
        check = _CHECKS.get(key)
        if check is None or not check(rule, value, schema, defs):
            return False
    return True


def _type(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    names = rule if isinstance(rule, list) else [rule]
    # bool is an int to Python, not an integer or number to JSON Schema; a float such as 2.0 is
    # an integer to jsonschema: not sure here, so jsonschema decides.
    kind = type(value)
    return any(kind in _TYPES.get(name, ()) and not (kind is bool and name in ("integer", "number"))
               for name in names)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and type(a) in _SCALARS and a == b


def _const(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return _same(value, rule)


def _enum(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return isinstance(rule, list) and any(_same(value, choice) for choice in rule)


def _ref(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    if not (isinstance(rule, str) and rule.startswith("#/$defs/") and rule[8:] in defs):
        return False
    return surely_valid(defs[rule[8:]], value, defs)


def _any_of(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return isinstance(rule, list) and any(surely_valid(branch, value, defs) for branch in rule)


def _all_of(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return isinstance(rule, list) and all(surely_valid(branch, value, defs) for branch in rule)


def _number(test: Any) -> Any:
    def check(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
        if type(value) not in (int, float):
            return True  # not a number (bool is none to JSON Schema): the keyword does not apply
        return type(rule) in (int, float) and test(value, rule)
    return check


def _length(test: Any, kind: type) -> Any:
    def check(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
        return not isinstance(value, kind) or (type(rule) is int and test(len(value), rule))
    return check


def _pattern(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return not isinstance(value, str) or bool(ecma_regex(rule).search(value))


def _required(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return not isinstance(value, dict) or all(name in value for name in rule)


def _properties(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    if not isinstance(value, dict):
        return True
    return all(surely_valid(sub, value[name], defs) for name, sub in rule.items() if name in value)


def _additional(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    if not isinstance(value, dict):
        return True
    if "patternProperties" in schema:
        return False
    known = schema.get("properties", {})
    return all(surely_valid(rule, item, defs) for name, item in value.items() if name not in known)


def _property_names(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    return not isinstance(value, dict) or all(surely_valid(rule, name, defs) for name in value)


def _items(rule: Any, value: Any, schema: Any, defs: dict[str, Any]) -> bool:
    if not isinstance(value, list):
        return True
    return "prefixItems" not in schema and all(surely_valid(rule, item, defs) for item in value)


_CHECKS: dict[str, Any] = {
    "type": _type, "const": _const, "enum": _enum, "$ref": _ref, "anyOf": _any_of, "allOf": _all_of,
    "minimum": _number(lambda v, r: v >= r), "maximum": _number(lambda v, r: v <= r),
    "exclusiveMinimum": _number(lambda v, r: v > r), "exclusiveMaximum": _number(lambda v, r: v < r),
    "minLength": _length(lambda n, r: n >= r, str), "maxLength": _length(lambda n, r: n <= r, str),
    "minItems": _length(lambda n, r: n >= r, list), "maxItems": _length(lambda n, r: n <= r, list),
    "minProperties": _length(lambda n, r: n >= r, dict), "maxProperties": _length(lambda n, r: n <= r, dict),
    "pattern": _pattern, "required": _required, "properties": _properties,
    "additionalProperties": _additional, "propertyNames": _property_names, "items": _items,
}
