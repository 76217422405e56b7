"""The JSON Schema of a flow file, generated from the step and connection registries, and the
translation of jsonschema's errors into file:line:col problems a person can act on."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from ..connections.registry import CONNECTION_TYPES
from ..errors import Problem, did_you_mean
from ..refs import kind_of
from ..steps import STEP_TYPES, generation as steps_generation
from .compiled import CompiledSchema
from .dialect import ecma_regex, validator_class
from .load import PathKey, SourceMap, format_path
from .model import INPUT_TYPES

SCHEMA_ID = "https://flowrunner.dev/schemas/flow.schema.json"
REFERENCE_BRANCH = {"$ref": "#/$defs/reference"}
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"

COMMON_STEP_PROPERTIES: dict[str, Any] = {
    "id": {"$ref": "#/$defs/name", "description": "unique within the flow; used in ${steps.ID.FIELD}"},
    "title": {"type": "string", "description": "shown in logs and progress"},
    "description": {"type": "string", "description": "documentation only"},
    "timeout": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"$ref": "#/$defs/reference"}],
                "description": "seconds the whole step may take"},
    "retry": {"$ref": "#/$defs/retry"},
    "run_on_failure": {"type": "boolean", "description": "run even after an earlier step failed"},
    "when": {"$ref": "#/$defs/condition"},
    "for_each": {"anyOf": [{"type": "array"}, {"$ref": "#/$defs/reference"}],
                 "description": "run the step once per item (${item}, ${item_index}); its result is the list of results"},
    "concurrency": {"type": "integer", "minimum": 1, "default": 1,
                    "description": "with for_each: how many items run at the same time"},
    "on_item_failure": {"enum": ["fail", "continue"], "default": "fail",
                        "description": "with for_each: continue: a failed item's result is null, its error in `errors`"},
}
_ANY_VALUE = {"description": "a value, or a ${...} reference"}
CONDITION: dict[str, Any] = {
    "type": "object",
    "description": "run the step only if this holds: {value: ${...}, OPERATOR: X}, {all: [...]}, {any: [...]} "
                   "or {not: {...}}; otherwise it is skipped (its outputs null)",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "value": {"description": "what to test: a ${...} reference or a value"},
        "equals": _ANY_VALUE, "not_equals": _ANY_VALUE,
        "in": {"anyOf": [{"type": "array"}, {"$ref": "#/$defs/reference"}], "description": "a list of values"},
        "not_in": {"anyOf": [{"type": "array"}, {"$ref": "#/$defs/reference"}], "description": "a list of values"},
        **{op: {"anyOf": [{"type": "number"}, {"$ref": "#/$defs/reference"}], "description": "a number"}
           for op in ("gt", "gte", "lt", "lte")},
        "contains": {"description": "text inside text, an item of a list, or a key of a mapping"},
        "empty": {"type": "boolean", "description": "true: the value is null, '', [] or {}"},
        "exists": {"type": "boolean", "description": "true: the value is not null"},
        "all": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/condition"}},
        "any": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/condition"}},
        "not": {"$ref": "#/$defs/condition"},
    },
}


def build_schema() -> dict[str, Any]:
    step_rules = []
    defs: dict[str, Any] = {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "reference": {"type": "string", "pattern": r"^\$\{[^}]+\}$", "description": "a ${...} reference"},
        "condition": CONDITION,
        "retry": {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "attempts": {"type": "integer", "minimum": 1, "description": "total tries"},
                        "backoff": {"type": "number", "minimum": 0, "description": "first delay, seconds"},
                        "max_backoff": {"type": "number", "minimum": 0},
                    },
                },
            ],
            "description": "tries in all (an integer), or {attempts, backoff, max_backoff}",
        },
        "input": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "type": {"enum": list(INPUT_TYPES)},
                "default": {},
                "description": {"type": "string"},
                "enum": {"type": "array", "minItems": 1},
            },
        },
    }
    for name, cls in sorted(STEP_TYPES.items()):
        frag = cls.schema()
        props = {**COMMON_STEP_PROPERTIES, **frag["properties"], "type": {"const": name}}
        if cls.connection_types:
            props["connection"] = {"type": "string", "description": "one of: " + ", ".join(cls.connection_types)}
        defs[f"step.{name}"] = {
            "type": "object",
            "description": cls.summary,
            "additionalProperties": False,
            "required": ["id", "type", *frag["required"]],
            "properties": props,
        }
        step_rules.append({"if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                           "then": {"$ref": f"#/$defs/step.{name}"}})
    conn_rules = []
    for name, ctype in sorted(CONNECTION_TYPES.items()):
        frag = ctype.schema()
        defs[f"connection.{name}"] = {
            "type": "object",
            "description": ctype.summary,
            "additionalProperties": False,
            "required": ["type", *frag["required"]],
            "properties": {"type": {"const": name}, **frag["properties"]},
        }
        conn_rules.append({"if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                           "then": {"$ref": f"#/$defs/connection.{name}"}})
    defs["step"] = {
        "type": "object",
        "required": ["id", "type"],
        "properties": {"type": {"enum": sorted(STEP_TYPES)}},
        "allOf": step_rules,
    }
    defs["connection"] = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": sorted(CONNECTION_TYPES)}},
        "allOf": conn_rules,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "flowrunner flow (format version 1)",
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "name", "steps"],
        "properties": {
            "version": {"const": 1, "description": "the flow format version"},
            "name": {"type": "string", "minLength": 1},
            "description": {"type": "string"},
            "inputs": {"type": "object", "propertyNames": {"$ref": "#/$defs/name"},
                       "additionalProperties": {"$ref": "#/$defs/input"}},
            "connections": {"type": "object", "propertyNames": {"$ref": "#/$defs/name"},
                            "additionalProperties": {"$ref": "#/$defs/connection"}},
            "steps": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/step"}},
            "outputs": {"type": "object", "propertyNames": {"$ref": "#/$defs/name"}},
        },
        "$defs": defs,
    }


def schema_text() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


def _compiled() -> CompiledSchema:
    return _compiled_for(steps_generation())


# Cached per generation of the step registry (a plugin may register a step type after a schema was
# built): the registry owns that number, so it needs no import of this module.
@lru_cache(maxsize=1)
def _compiled_for(_generation: int) -> CompiledSchema:
    return CompiledSchema(build_schema())


def schema_problems(data: Any, smap: SourceMap) -> list[Problem]:
    """Every schema violation in `data`, each placed at its file:line:col, sorted by position."""
    problems: list[Problem] = []
    compiled = _compiled()
    for error in compiled.iter_errors(compiled.flow, data):
        problems.extend(_describe(error, smap))
    unique = {(p.location.line if p.location else 0, p.location.col if p.location else 0, p.message): p
              for p in problems}
    return sorted(unique.values(), key=lambda p: (p.location.line or 0, p.location.col or 0) if p.location else (0, 0))


def _runtime_validator(step_type: str, prop: str) -> Any:
    validators = _runtime_validators_for(steps_generation())
    key = (step_type, prop)
    if key not in validators:
        validators[key] = _runtime_validator_for(step_type, prop)
    return validators[key]


# The current generation's validators only: a new generation (a plugin registered a step type) drops
# the old ones, and within one, every (step type, property) a flow uses stays built (no eviction).
@lru_cache(maxsize=1)
def _runtime_validators_for(_generation: int) -> dict[tuple[str, str], Any]:
    return {}


def _runtime_validator_for(step_type: str, prop: str) -> Any:
    """One property's schema, without the reference branch and shallow (no per-item checks, so a
    384-float vector costs microseconds): for values that arrive through a ${...} reference."""
    full = build_schema()
    defs = _without_references(full["$defs"])
    schema = _shallow(defs[f"step.{step_type}"]["properties"].get(prop, {}))
    return validator_class()({"$schema": full["$schema"], **schema, "$defs": defs})


def _shallow(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_shallow(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    drop = ("items", "properties", "additionalProperties", "propertyNames", "required")
    return {k: _shallow(v) for k, v in schema.items() if k not in drop}


def runtime_problems(step_type: str, props: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Messages for the resolved properties `keys` that the step type does not take."""
    generation = steps_generation()
    checked = [key for key in keys if type(props[key]) is not str or not _text_only(generation, step_type, key)]
    if not checked:
        return []
    smap = SourceMap("", "")
    return [f"{key}: {p.message}" for key in checked
            for e in _runtime_validator(step_type, key).iter_errors(props[key]) for p in _describe(e, smap)]


_ANNOTATIONS = frozenset({"$schema", "$defs", "type", "description", "default", "title", "examples"})


@lru_cache(maxsize=256)
def _text_only(_generation: int, step_type: str, prop: str) -> bool:
    """The property's schema asks only for text (a prompt, a model): a str is valid without running the
    validator, which takes some 10 us per property per run (in serve: per request)."""
    schema = _runtime_validator(step_type, prop).schema
    return schema.get("type") == "string" and _ANNOTATIONS.issuperset(schema)


def _without_references(schema: Any) -> Any:
    """Drop the `${...} reference` branch of every anyOf (inlining a lone remaining branch)."""
    if isinstance(schema, list):
        return [_without_references(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _without_references(v) for k, v in schema.items()}
    if "anyOf" in out:
        kept = [b for b in out["anyOf"] if b != REFERENCE_BRANCH]
        if len(kept) == 1:
            rest = {k: v for k, v in out.items() if k != "anyOf"}
            return {**kept[0], **{k: v for k, v in rest.items() if k not in kept[0]}}
        out["anyOf"] = kept
    return out


def connections_file_problems(data: Any, smap: SourceMap) -> list[Problem]:
    compiled = _compiled()
    return [p for error in compiled.iter_errors(compiled.connections_file, data) for p in _describe(error, smap)]


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "null"}


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: Any, smap: SourceMap) -> list[Problem]:
    path: PathKey = tuple(error.absolute_path)
    dotted = format_path(path)
    where = smap.location(path)
    v, inst, sch = error.validator, error.instance, error.schema
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = set(sch.get("properties", {}))
        out = []
        for key in inst:
            if key in allowed:
                continue
            hint = did_you_mean(key, allowed) or ("allowed: " + ", ".join(sorted(allowed)))
            out.append(Problem(f"unknown property '{key}'", smap.location((*path, key), key=True),
                               format_path((*path, key)), hint))
        return out
    if v == "required" and isinstance(inst, dict):
        missing = [r for r in error.validator_value if r not in inst]
        return [Problem(f"missing required property '{m}'", where, dotted, _required_hint(m, sch)) for m in missing]
    if v == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in wanted)
        if isinstance(sch, dict) and sch.get("writeOnly"):  # a secret (api_key, dsn...): never echo its value
            return [Problem(f"expected {words}, got {kind_of(inst)} (a secret: its value is not shown)", where, dotted,
                            "write it as one string, best from the environment: ${env.NAME}")]
        return [Problem(f"expected {words}, got {kind_of(inst)} {_show(inst)}", where, dotted, _type_hint(wanted, inst))]
    if v == "enum":
        choices = [str(c) for c in error.validator_value]
        if path[-1:] == ("type",) and len(path) >= 3 and path[-3] == "steps":
            return [Problem(f"{_show(inst)} is not a step type", where, dotted,
                            f"{did_you_mean(str(inst), choices) or 'see the step types:'} (flowrunner steps lists them)")]
        if path[-1:] == ("type",) and len(path) == 3 and path[0] == "connections":
            return [Problem(f"{_show(inst)} is not a connection type", where, dotted,
                            did_you_mean(str(inst), choices) or "one of: " + ", ".join(choices))]
        return [Problem(f"{_show(inst)} is not one of: {', '.join(choices)}", where, dotted,
                        did_you_mean(str(inst), choices))]
    if v == "const":
        if path == ("version",):
            return [Problem(f"unsupported flow format version {_show(inst)}", where, dotted,
                            "this flowrunner reads `version: 1`")]
        return [Problem(f"must be {_show(error.validator_value)}", where, dotted)]
    if v == "pattern":
        if error.validator_value == NAME_PATTERN:
            return [Problem(f"{_show(inst)} is not a valid name", where, dotted,
                            "use letters, digits, '_' and '-', starting with a letter or '_'")]
        return [Problem(f"{_show(inst)} is not {sch.get('description') or 'of the expected form'}", where, dotted)]
    if v == "propertyNames":
        bad = [k for k in inst if not _valid_name(k)] if isinstance(inst, dict) else []
        return [Problem(f"{_show(k)} is not a valid name", smap.location((*path, k), key=True),
                        format_path((*path, k)), "use letters, digits, '_' and '-', starting with a letter or '_'")
                for k in bad] or [Problem(error.message[:200], where, dotted)]
    if v == "anyOf":
        inside = [c for c in error.context if c.relative_path]
        if inside:  # the value has the right type, and something inside it is wrong: name that, where it is
            from jsonschema.exceptions import best_match

            return _describe(best_match(inside), smap)
        for c in error.context if isinstance(inst, dict) else ():  # a key breaking propertyNames
            if c.validator in ("pattern", "maxLength") and isinstance(c.instance, str) and c.instance in inst:
                rule = (f"does not match {c.validator_value}" if c.validator == "pattern"
                        else f"is longer than {c.validator_value} characters")
                return [Problem(f"the key {_show(c.instance)} {rule}", smap.location((*path, c.instance), key=True),
                                format_path((*path, c.instance)))]
        return [_any_of(error, inst, where, dotted)]
    if v in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<"}[v]
        return [Problem(f"must be {sign} {error.validator_value}, got {_show(inst)}", where, dotted)]
    if v == "minItems":
        what = "at least one step" if path == ("steps",) else f"at least {error.validator_value} item(s)"
        return [Problem(f"needs {what}", where, dotted)]
    if v == "minProperties":
        return [Problem(f"needs at least {error.validator_value} entry", where, dotted)]
    if v == "minLength":
        return [Problem("must not be empty", where, dotted)]
    if v == "maxLength":
        return [Problem(f"is {len(inst)} characters long, at most {error.validator_value} allowed", where, dotted)]
    return [Problem(error.message[:200], where, dotted)]


def _any_of(error: Any, inst: Any, where: Any, dotted: str) -> Problem:
    """A property that takes a value or a reference: say what it takes, plus the most useful reason."""
    branches = error.validator_value
    takes_ref = any(b.get("$ref") == "#/$defs/reference" for b in branches)
    types = [t for b in branches for t in (b["type"] if isinstance(b.get("type"), list) else [b.get("type")]) if t]
    words = " or ".join(_TYPE_WORDS.get(t, t) for t in types) or "a valid value"
    if takes_ref:
        words += " or a ${...} reference"
    if isinstance(inst, str) and takes_ref and "${" in inst:
        return Problem(f"{_show(inst)} must be exactly one ${{...}} reference here", where, dotted)
    patterned = [b for b in branches if "pattern" in b and "description" in b]
    if isinstance(inst, str) and patterned:
        return Problem(f"{_show(inst)} is not {patterned[0]['description']}", where, dotted)
    ruled = [c for c in error.context if c.validator in ("enum", "maxItems", "maxProperties") and not c.relative_path]
    if ruled and isinstance(inst, (str, list, dict)):  # the right type breaking a rule: say which rule
        rule = ruled[0]
        if rule.validator == "enum":
            choices = [str(c) for c in rule.validator_value]
            return Problem(f"{_show(inst)} is not one of: {', '.join(choices)}", where, dotted,
                           did_you_mean(str(inst), choices))
        return Problem(f"has {len(inst)} {'items' if isinstance(inst, list) else 'keys'}, at most "
                       f"{rule.validator_value} allowed", where, dotted)
    detail = [c for c in error.context if c.validator not in ("type", "pattern")]
    if detail and type(inst).__name__ in ("int", "float", "dict") and detail[0].validator != "additionalProperties":
        return Problem(f"{detail[0].message[:120]}", where, dotted)
    if isinstance(inst, dict):
        extra = [c for c in error.context if c.validator == "additionalProperties"]
        if extra:
            allowed = set(extra[0].schema.get("properties", {}))
            bad = [k for k in inst if k not in allowed]
            return Problem(f"unknown property '{bad[0]}'", where, dotted,
                           did_you_mean(bad[0], allowed) or "allowed: " + ", ".join(sorted(allowed)))
    return Problem(f"expected {words}, got {kind_of(inst)} {_show(inst)}", where, dotted)


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and ecma_regex(NAME_PATTERN).search(name) is not None


_TOP_LEVEL_HINTS = {
    "version": "add `version: 1` at the top of the file",
    "name": "add `name: my-flow`",
    "steps": "add `steps:`, a list of steps (flowrunner steps lists the types)",
    "id": "give the step an `id:`, unique within the flow",
    "type": "give it a `type:` (flowrunner steps lists the step types)",
}


def _required_hint(name: str, schema: dict[str, Any]) -> str | None:
    if name in _TOP_LEVEL_HINTS:
        return _TOP_LEVEL_HINTS[name]
    prop = schema.get("properties", {}).get(name, {})
    return prop.get("description")


def _type_hint(wanted: list[str], inst: Any) -> str | None:
    if "string" in wanted and isinstance(inst, (dict, list)):
        return "quote the value, or use a block scalar (|) for multi-line text"
    if "string" in wanted and isinstance(inst, (bool, int, float)) and not isinstance(inst, str):
        return f'quote it: "{inst}"' if not isinstance(inst, bool) else 'quote it: "true"'
    if inst is None:
        return "the value is empty; give one or remove the key"
    return None
