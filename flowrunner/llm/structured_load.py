"""Structured output at load time: the chat step's `output_schema` / `response_format` checked before
anything runs. The schema must itself be a valid JSON Schema (checked against its meta-schema, with
`pattern`s compiled), each mistake at the file:line:col of the bad part, in the flow or in the schema
file that `output_schema: {file: ...}` names (schema_files.py reads it)."""

from __future__ import annotations

from typing import Any

from ..errors import FlowDefinitionError, Problem, did_you_mean
from ..flow.load import PathKey, SourceMap, format_path
from .schema_files import read_schema_file, schema_path, shown_name
from .structured import FLAT, declared_schema_value, response_format_of, schema_from_props

_JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")


def check(spec: Any, flow: Any) -> list[Problem]:
    """Every problem of the step's structured-output properties, located."""
    props = spec.props
    smap: SourceMap | None = getattr(flow, "source", None)
    out: list[Problem] = []

    def problem(message: str, path: PathKey, hint: str | None = None) -> None:
        where = smap.location((*spec.path, *path)) if smap else spec.location
        out.append(Problem(message, where, format_path((*spec.path, *path)), hint))

    fmt = response_format_of(props)
    if "output_schema" in props and "response_format" in props:
        problem("give output_schema or response_format, not both", ("response_format",),
                "output_schema sends response_format json_schema itself")
    if "strict" in props and "output_schema" not in props:
        problem("`strict` applies to output_schema", ("strict",),
                "with response_format, write strict in it (beside name and schema)")
    if isinstance(fmt, dict):
        _format_problems(fmt, problem)
    where, schema = schema_from_props(props)
    if where is None:
        return out
    if where == ("output_schema",) and isinstance(schema, dict) and "file" in schema:
        if len(schema) > 1:
            other = next(k for k in schema if k != "file")
            problem(f"output_schema with `file` takes nothing else (found '{other}')", ("output_schema", other),
                    "put the whole schema in the file, or write it inline without `file`")
            return out
        name = schema["file"]
        if not isinstance(name, str):
            return out  # the flow schema said so
        try:
            data, fsmap = read_schema_file(schema_path(spec_file(flow, spec), name), shown_name(spec_file(flow, spec), name))
        except FlowDefinitionError as e:
            first = e.problems[0]
            if first.location is not None and first.location.line is not None:
                return [*out, *e.problems]  # inside the schema file
            shown = name if name.isprintable() else repr(name)  # a NUL or an escape never reaches the terminal
            problem(f"{shown}: {first.message}", ("output_schema", "file"), first.hint)
            return out
        if not isinstance(data, dict):
            out.append(Problem("a JSON Schema for output_schema must be an object", fsmap.location(()), "",
                               'e.g. {"type": "object", "properties": {...}}'))
            return out
        out += meta_problems(data, lambda p: fsmap.location(p), "")
        return out
    if not isinstance(schema, dict):
        return out  # the flow schema said so
    template = _first_template(schema, ())
    if template is not None:
        problem("a reference is not resolved inside a JSON Schema", (*where, *template),
                "write the schema as it is; $${ writes a literal ${")
        return out
    base = (*spec.path, *where)
    locate = (lambda p: smap.location((*base, *p))) if smap else (lambda p: spec.location)
    out += meta_problems(schema, locate, format_path(base))
    return out


def _format_problems(fmt: dict[str, Any], problem: Any) -> None:
    """response_format's shape: json_schema's fields nested under `json_schema:` or flat beside `type`."""
    flat = [key for key in FLAT if key in fmt]
    if fmt.get("type") != "json_schema":
        for key in [*(["json_schema"] if "json_schema" in fmt else []), *flat]:
            problem(f"{key} is for type json_schema, not {fmt.get('type')!r}", ("response_format", key))
    elif "json_schema" in fmt and flat:
        problem(f"write {flat[0]} inside json_schema, or leave json_schema out and write every field beside type",
                ("response_format", flat[0]), "two shapes: {type, json_schema: {name, schema, strict}} or "
                                              "{type, name, schema, strict}")
    elif "json_schema" not in fmt and "name" not in fmt:
        problem("response_format json_schema needs a name", ("response_format",),
                "{type: json_schema, name: NAME, schema: {...}} (letters, digits, '_' and '-')")


def spec_file(flow: Any, spec: Any) -> str:
    smap = getattr(flow, "source", None)
    if smap is not None:
        return smap.file
    return spec.location.file if spec.location else "."


def meta_problems(schema: dict[str, Any], locate: Any, prefix: str) -> list[Problem]:
    """`schema` checked against its meta-schema (its `$schema`, else draft 2020-12), patterns compiled."""
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    from ..flow.dialect import validator_class

    cls = validator_for(schema, default=None) if "$schema" in schema else validator_class()
    if cls is None:
        return [Problem(f"unknown $schema {schema['$schema']!r}", locate(("$schema",)), _join(prefix, ("$schema",)),
                        "leave $schema out (draft 2020-12), or name a JSON Schema draft jsonschema knows")]
    checker = cls(cls.META_SCHEMA, format_checker=cls.FORMAT_CHECKER)
    problems, seen = _ref_problems(schema, schema, (), locate, prefix), set()
    for error in checker.iter_errors(schema):
        error = best_match([error])
        path = tuple(error.absolute_path)
        if path in seen:
            continue
        seen.add(path)
        problems.append(Problem(f"not a valid JSON Schema: {_meta_message(error)}", locate(path),
                                _join(prefix, path), _meta_hint(error)))
    return problems


def _ref_problems(node: Any, root: dict[str, Any], path: PathKey, locate: Any, prefix: str) -> list[Problem]:
    """Each `$ref` that does not point inside the schema: nothing is fetched, so it would fail every answer."""
    from ..flow.shapes import resolve

    out: list[Problem] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = (*path, key)
        if key == "$ref" and isinstance(value, str) and resolve(value, root) is None:
            hint = ("only $refs inside this schema are followed: #/$defs/NAME" if not value.startswith("#")
                    else "define it under $defs")
            out.append(Problem(f"$ref {value!r} points at nothing in this schema", locate(where),
                               _join(prefix, where), hint))
        elif isinstance(value, (dict, list)) and key not in ("enum", "const", "examples", "default"):
            out += _ref_problems(value, root, where, locate, prefix)
    return out


def _meta_message(error: Any) -> str:
    from ..secrets import shorten

    if error.validator == "format" and error.validator_value == "regex":
        return f"{shorten(repr(error.instance), 80)} is not a valid regular expression"
    if tuple(error.absolute_path)[-1:] == ("type",) and isinstance(error.instance, str):
        return f"{error.instance!r} is not a JSON type"
    return shorten(error.message, 200)


def _meta_hint(error: Any) -> str | None:
    if tuple(error.absolute_path)[-1:] == ("type",) and isinstance(error.instance, str):
        return did_you_mean(error.instance, _JSON_TYPES) or "one of: " + ", ".join(_JSON_TYPES)
    return None


def _join(prefix: str, path: PathKey) -> str:
    inner = format_path(path)
    if not inner:
        return prefix
    if not prefix:
        return inner
    return prefix + (inner if inner.startswith("[") else "." + inner)


def _first_template(value: Any, path: PathKey) -> PathKey | None:
    from ..refs import Template

    if isinstance(value, Template):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_template(item, (*path, key))
        if found is not None:
            return found
    return None


def declared_shape(spec: Any, flow: Any) -> dict[str, Any] | None:
    """The JSON Schema of the step's `json` output, when a schema is set and can be read; else None
    (check() reports why)."""
    where, schema = schema_from_props(spec.props)
    if where is None or not isinstance(schema, dict):
        return None
    if where == ("output_schema",) and "file" in schema:
        if len(schema) != 1 or not isinstance(schema["file"], str):
            return None
        file = spec_file(flow, spec)
        try:
            data, _ = read_schema_file(schema_path(file, schema["file"]), shown_name(file, schema["file"]))
        except FlowDefinitionError:
            return None
        return data if isinstance(data, dict) else None
    return declared_schema_value(schema)
