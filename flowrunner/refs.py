"""`${...}` references: parsing, and resolving them against a run's values.

A reference is a lookup, never an expression: a root (`inputs`, `steps`, `env` or a variable name)
followed by `.name` and `[N]` parts. A string that is exactly one reference resolves to the value
itself (a list stays a list); references inside longer text are interpolated as text. `$${` writes
a literal `${`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_PART = re.compile(rf"\.({_NAME})|\[(\d+)\]")
_ROOT = re.compile(rf"\s*({_NAME})")
SPECIAL_ROOTS = ("inputs", "steps", "env")


class RefSyntaxError(ValueError):
    def __init__(self, message: str, fragment: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fragment = fragment  # the text to point at in the source
        self.hint = hint


@dataclass(frozen=True)
class Ref:
    """One ${...} reference: its text, its root and the path inside it."""

    text: str  # as written, e.g. "${passages[0].content}"
    root: str
    path: tuple[str | int, ...]

    @property
    def kind(self) -> str:
        return self.root if self.root in SPECIAL_ROOTS else "var"

    @property
    def name(self) -> str:
        """The input, step, env var or variable the reference starts from."""
        if self.kind == "var":
            return self.root
        return str(self.path[0]) if self.path else ""


@dataclass(frozen=True)
class Template:
    """A string with references in it, parsed once at load time."""

    parts: tuple[str | Ref, ...]

    @property
    def refs(self) -> tuple[Ref, ...]:
        return tuple(p for p in self.parts if isinstance(p, Ref))

    @property
    def whole(self) -> Ref | None:
        return self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], Ref) else None

    @property
    def written(self) -> str:
        """The template as written in the flow (e.g. ${inputs.db}), for messages."""
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)


def parse(text: str) -> Template | str:
    """Parse a string; a plain string (with `$${` unescaped) comes back when it holds no reference."""
    if "$" not in text:
        return text
    parts: list[str | Ref] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$${", i):
            buf.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            end = text.find("}", i + 2)
            if end < 0:
                raise RefSyntaxError(
                    "unterminated reference: '${' without a closing '}'",
                    text[i : i + 20],
                    hint="close it with '}', or write '$${' for a literal '${'",
                )
            ref = _parse_ref(text[i : end + 1])
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(ref)
            i = end + 1
            continue
        buf.append(text[i])
        i += 1
    if buf:
        parts.append("".join(buf))
    if not any(isinstance(p, Ref) for p in parts):
        return "".join(p for p in parts if isinstance(p, str))
    return Template(tuple(parts))


def _parse_ref(text: str) -> Ref:
    inner = text[2:-1]
    m = _ROOT.match(inner)
    if not m:
        raise RefSyntaxError(
            f"bad reference {text}: it must start with a name",
            text,
            hint="write ${inputs.NAME}, ${steps.ID.FIELD}, ${env.NAME} or ${variable}",
        )
    root = m.group(1)
    pos = m.end()
    path: list[str | int] = []
    while pos < len(inner):
        pm = _PART.match(inner, pos)
        if not pm:
            rest = inner[pos:].strip()
            if not rest:
                break
            raise RefSyntaxError(
                f"bad reference {text}: unexpected {inner[pos:].strip()[:20]!r}",
                text,
                hint="references are lookups, not expressions: use .name and [N] only",
            )
        path.append(pm.group(1) if pm.group(1) is not None else int(pm.group(2)))
        pos = pm.end()
    if root in SPECIAL_ROOTS and (not path or isinstance(path[0], int)):
        raise RefSyntaxError(
            f"bad reference {text}: '{root}' needs a name after it",
            text,
            hint=f"write ${{{root}.NAME}}",
        )
    if root == "steps" and len(path) < 2:
        raise RefSyntaxError(
            f"bad reference {text}: name the output too",
            text,
            hint="write ${steps.ID.FIELD}, e.g. ${steps.answer.finish_reason}",
        )
    return Ref(text, root, tuple(path))


class RefValueError(LookupError):
    """A reference that is well formed but finds nothing at run time (an index out of range...)."""


@dataclass
class Scope:
    """What references resolve against while a flow runs."""

    inputs: Mapping[str, Any]
    variables: Mapping[str, Any]
    steps: Mapping[str, Mapping[str, Any]]
    env: Mapping[str, str] | None = None
    # After a failed step, a run_on_failure step may refer to what the failed step never produced:
    # such a missing name reads as null (the save step then stores what there is), never as an error.
    missing_is_null: bool = False
    # Outputs a step may leave null although it succeeded (usage from a server that sends none, or in a
    # dry run): step id -> output names. What a path inside one of them does not find reads as null,
    # noted in `absent` (the run warns once for each), so a run whose steps all succeeded never fails
    # over it. A path inside any other output still fails where it finds nothing.
    optional: Mapping[str, Collection[str]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    # Steps that were skipped (`when`), as "steps.ID", and the variables they left null: a path
    # inside their null reads null too, as the step's own outputs do.
    skipped: Collection[str] = ()

    def lookup(self, ref: Ref) -> Any:
        kind = ref.kind
        roots: dict[str, Any] = {"inputs": self.inputs, "steps": self.steps, "env": self.env or {}}
        if kind == "var":
            value: Any = self.variables
            path: tuple[str | int, ...] = (ref.root, *ref.path)
            seen = ""
        else:
            value, path, seen = roots[kind], ref.path, kind
        inside_optional = kind == "steps" and len(path) > 2 and path[1] in self.optional.get(str(path[0]), ())
        for depth, part in enumerate(path):
            if value is None and self.skipped and depth and kind in ("steps", "var") and (
                    f"steps.{path[0]}" if kind == "steps" else str(path[0])) in self.skipped:
                return None
            if inside_optional and depth >= 2 and (value is None or (
                    isinstance(value, Mapping) and isinstance(part, str) and part not in value)):
                if depth == 2 and value is None:
                    said = f"step '{path[0]}' returned no {path[1]}"
                else:
                    said = f"{seen} is null" if value is None else f"{seen} has no '{part}'"
                self.absent.append(f"{ref.text} is null: {said}")
                return None
            if isinstance(part, int):
                if not isinstance(value, list):
                    raise RefValueError(f"{ref.text}: {seen} is {kind_of(value)}, not a list")
                if part >= len(value):
                    raise RefValueError(f"{ref.text}: {seen} has {len(value)} item(s), no [{part}]")
                value = value[part]
                seen += f"[{part}]"
            else:
                if not isinstance(value, Mapping):
                    raise RefValueError(f"{ref.text}: {seen} is {kind_of(value)}, it has no '{part}'")
                if part not in value:
                    if self.missing_is_null:
                        return None
                    raise RefValueError(f"{ref.text}: {seen or 'the run'} has no '{part}'")
                value = value[part]
                seen = f"{seen}.{part}" if seen else part
        return value


def kind_of(value: Any) -> str:
    """"a string", "a list", ... for messages about a value of the wrong kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def to_text(value: Any) -> str:
    """How a value reads when interpolated into text."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def resolve(value: Any, scope: Scope) -> Any:
    """Replace every Template inside `value` (dicts and lists walked) with what it refers to."""
    if isinstance(value, Template):
        whole = value.whole
        if whole is not None:
            return scope.lookup(whole)
        return "".join(p if isinstance(p, str) else to_text(scope.lookup(p)) for p in value.parts)
    if isinstance(value, dict):
        return {k: resolve(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, scope) for v in value]
    return value


def compile_value(value: Any) -> Any:
    """Parse every string inside `value` (walking dicts and lists); raises RefSyntaxError."""
    if isinstance(value, str):
        return parse(value)
    if isinstance(value, dict):
        return {k: compile_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compile_value(v) for v in value]
    return value


def found_in(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], Ref]]:
    """Every reference in a compiled value (Templates inside mappings and lists), with the path of the
    string that holds it, for errors located at file:line:col."""
    if isinstance(value, Template):
        for ref in value.refs:
            yield path, ref
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from found_in(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from found_in(v, (*path, i))
