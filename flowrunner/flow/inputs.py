"""Typed flow inputs: `-i k=v` strings coerced to the declared type, defaults filled in."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ..errors import FlowDefinitionError, Problem, did_you_mean
from ..refs import kind_of
from .load import MAX_DEPTH, MAX_INT_DIGITS, IntegerTooLong, read_int
from .model import Flow, InputSpec

_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off"}


class InputError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def coerce(spec: InputSpec, value: Any, *, from_text: bool) -> Any:
    """`value` as the input's declared type. Text from the command line is parsed; values from a
    JSON/YAML inputs file must already have the type (an integer may stand for a number)."""
    t = spec.type
    if from_text and isinstance(value, str):
        value = _parse_text(t, value)
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }[t]
    if not ok:
        raise InputError(f"expected {'an' if t[0] in 'aeiou' else 'a'} {t}, got {_shown(value)}")
    if t == "number" and not _finite(value):
        raise InputError("expected a finite number" + (" (this one is too large)" if isinstance(value, int) else ""))
    if t in ("array", "object") and _too_deep(value):
        raise InputError(f"the value is nested more than {MAX_DEPTH} levels deep")
    if t in ("array", "object") and not _all_finite(value):  # JSON's NaN, 1e999: no request could carry them
        raise InputError("the value holds a number that is not finite (NaN or infinity)")
    if spec.enum is not None and value not in spec.enum:
        raise InputError(f"{value!r} is not one of: {', '.join(map(str, spec.enum))}")
    return value


def _shown(value: Any) -> str:
    try:
        return json.dumps(value, default=str)[:60]
    except (ValueError, RecursionError):  # an integer too long for text, or a value nested too deeply
        return kind_of(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond a float's range: no step could use it as a number
        return False


def _all_finite(value: Any) -> bool:
    """No float in `value` is NaN or infinite (walked without recursion, as _too_deep; after it)."""
    level: list[Any] = [value]
    while level:
        if any(type(v) is float and not math.isfinite(v) for v in level):
            return False
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
    return True


def _too_deep(value: Any) -> bool:
    """Deeper than MAX_DEPTH levels, found without recursion (the value may be too deep for it)."""
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH + 1):
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (dict, list))]
        if not level:
            return False
    return True


def _parse_text(t: str, text: str) -> Any:
    if t == "string":
        return text
    if t in ("integer", "number") and len(text.strip()) > MAX_INT_DIGITS:
        raise InputError(f"the {t} has more than {MAX_INT_DIGITS} digits")
    if t == "integer":
        try:
            if "_" in text:  # Python's int() takes 1_000; a flow's user means something else, or a typo
                raise ValueError
            return int(text.strip())
        except ValueError:
            raise InputError(f"expected an integer, got {text[:60]!r}") from None
    if t == "number":
        try:
            if "_" in text:
                raise ValueError
            return float(text) if any(c in text for c in ".eE") or text.strip().lower() in ("inf", "nan") else int(text)
        except ValueError:
            raise InputError(f"expected a number, got {text[:60]!r}") from None
    if t == "boolean":
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise InputError(f"expected true or false, got {text[:60]!r}")
    try:
        return json.loads(text, parse_int=read_int)
    except json.JSONDecodeError as e:
        raise InputError(f"expected JSON for an {t} ({e.msg})") from None
    except IntegerTooLong:
        raise InputError(f"expected JSON for an {t} (an integer has more than {MAX_INT_DIGITS} digits)") from None
    except RecursionError:
        raise InputError(f"the value is nested more than {MAX_DEPTH} levels deep") from None


def resolve_inputs(flow: Flow, given: Mapping[str, Any], *, from_text: frozenset[str] = frozenset()) -> dict[str, Any]:
    """All the flow's inputs: given values coerced, defaults filled; every problem reported at once.
    `from_text` names the inputs that came as command-line text."""
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for name in given:
        if name not in flow.inputs:
            declared = ", ".join(flow.inputs) or "none"
            problems.append(Problem(f"unknown input '{name}'", path=f"inputs.{name}",
                                    hint=did_you_mean(name, flow.inputs) or f"this flow's inputs: {declared}"))
    for name, spec in flow.inputs.items():
        if name in given:
            try:
                values[name] = coerce(spec, given[name], from_text=name in from_text)
            except InputError as e:
                problems.append(Problem(f"input '{name}': {e.reason}", path=f"inputs.{name}",
                                        hint=f"declared as {spec.type}" + (f": {spec.description}" if spec.description else "")))
        elif spec.has_default:
            values[name] = spec.default
        else:
            problems.append(Problem(f"missing required input '{name}'", path=f"inputs.{name}",
                                    hint=f"pass it with -i {name}=..." + (f" ({spec.description})" if spec.description else "")))
    if problems:
        raise FlowDefinitionError(problems)
    return values
