"""Step conditions (`when:`): parsed when the flow is loaded, type-checked there where the types are
known, and evaluated against a run's values. Pure functions: no engine, no I/O.

    {value: ${steps.retrieve.count}, gt: 0}
    {all: [...]}  {any: [...]}  {not: {...}}

A condition is a lookup and a comparison, never an expression. What a reference inside it does not
find reads as null, so `exists` and `empty` can test for it; a comparison of kinds that cannot be
compared (gt on text) is an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from . import refs
from .refs import kind_of

OPERATORS = ("equals", "not_equals", "in", "not_in", "gt", "gte", "lt", "lte", "contains", "empty", "exists")
LOGICAL = ("all", "any", "not")
_ORDER = {"gt": ">", "gte": "≥", "lt": "<", "lte": "≤"}
# What a condition compares: "number" for integer and number inputs alike; None: unknown at load.
Kind = Union[str, None]


class _Node:
    """Plain classes, not dataclasses: building dataclasses costs `validate` start-up time (model.py).
    Conditions written the same compare equal (flow/guards.py looks for a reader's guard)."""

    __slots__ = ()

    def _key(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class Test(_Node):
    """{value: X, OP: Y}: the only leaf."""

    __slots__ = ("value", "op", "operand", "path")

    def __init__(self, value: Any, op: str, operand: Any, path: tuple[str | int, ...] = ()) -> None:
        self.value = value  # a literal, or a refs.Template
        self.op = op
        self.operand = operand  # a literal, or a refs.Template
        self.path = path  # where the mapping is written; not part of what it means

    def _key(self) -> tuple[Any, ...]:
        return (self.value, self.op, self.operand)


class _Items(_Node):
    """{all: [...]} and {any: [...]}: equal only to their own kind (_Node.__eq__ compares types)."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[Condition, ...]) -> None:
        self.items = items

    def _key(self) -> tuple[Any, ...]:
        return self.items


class AllOf(_Items):
    __slots__ = ()


class AnyOf(_Items):
    __slots__ = ()


class Not(_Node):
    __slots__ = ("item",)

    def __init__(self, item: Condition) -> None:
        self.item = item

    def _key(self) -> tuple[Any, ...]:
        return (self.item,)


Condition = Union[Test, AllOf, AnyOf, Not]


class ConditionError(ValueError):
    """Two values a condition cannot compare at run time (gt on text): the step fails with it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


# --- load time -------------------------------------------------------------------------------

Report = Callable[..., None]  # report(message, path, hint=None, key=False)


def parse(raw: Any, path: tuple[str | int, ...], compile_value: Callable[[Any, tuple[str | int, ...]], Any],
          report: Report) -> Condition | None:
    """The condition written at `path`, its strings compiled by `compile_value`; problems the schema
    cannot see (two operators, a missing value) go to `report`. None when it is unusable; what the
    schema already reports (not a mapping, an unknown key) is not reported again."""
    if not isinstance(raw, dict):
        return None
    logical = [k for k in raw if k in LOGICAL]
    ops = [k for k in raw if k in OPERATORS]
    if logical:
        mixed = logical[1:] + ops + (["value"] if "value" in raw else [])
        if mixed:
            report(f"a condition is one of {{value, OPERATOR}}, {{all}}, {{any}} or {{not}}; this one has "
                   f"both '{logical[0]}' and '{mixed[0]}'", (*path, mixed[0]),
                   f"nest them: {{all: [{{...}}, {{...}}]}}", key=True)
            return None
        key = logical[0]
        if key == "not":
            inner = parse(raw[key], (*path, key), compile_value, report)
            return Not(inner) if inner is not None else None
        if not isinstance(raw[key], list) or not raw[key]:
            return None  # the schema says what it takes
        items = [parse(item, (*path, key, i), compile_value, report) for i, item in enumerate(raw[key])]
        if any(item is None for item in items):
            return None
        return (AllOf if key == "all" else AnyOf)(tuple(items))  # type: ignore[arg-type]
    if len(ops) > 1:
        report(f"two operators in one condition: '{ops[0]}' and '{ops[1]}'", (*path, ops[1]),
               f"one operator per condition; for both, write all: [{{value: ..., {ops[0]}: ...}}, "
               f"{{value: ..., {ops[1]}: ...}}]", key=True)
        return None
    if not ops:
        if list(raw) == ["value"]:  # with an unknown key too, the schema's "unknown property" says it
            report("the condition has no operator", path, "add one of: " + ", ".join(OPERATORS))
        return None  # otherwise only unknown keys, which the schema reports
    if "value" not in raw:
        report(f"the condition '{ops[0]}' has no `value:` to test", path,
               f"write {{value: ${{...}}, {ops[0]}: ...}}")
        return None
    op = ops[0]
    return Test(compile_value(raw["value"], (*path, "value")), op, compile_value(raw[op], (*path, op)), path)


def tests(cond: Condition) -> list[Test]:
    """Every leaf of `cond`."""
    if isinstance(cond, Test):
        return [cond]
    if isinstance(cond, Not):
        return tests(cond.item)
    return [t for item in cond.items for t in tests(item)]


def conjuncts(cond: Condition) -> list[Condition]:
    """The conditions that all hold when `cond` holds, as written: itself, and inside `all:`."""
    if isinstance(cond, AllOf):
        return [cond, *(c for item in cond.items for c in conjuncts(item))]
    return [cond]


_OPPOSITE = {"equals": "not_equals", "in": "not_in", "gt": "lte", "gte": "lt"}
_OPPOSITE.update({b: a for a, b in _OPPOSITE.items()})


def complementary(a: Condition, b: Condition) -> bool:
    """Whether one of `a` and `b` always holds, as written: C and {not: C}; equals and not_equals
    (in / not_in, gt / lte, gte / lt) of the same value and operand; empty or exists true and false."""
    if isinstance(a, Not) or isinstance(b, Not):
        return (isinstance(a, Not) and a.item == b) or (isinstance(b, Not) and b.item == a)
    if not (isinstance(a, Test) and isinstance(b, Test)) or a.value != b.value:
        return False
    if a.op == b.op and a.op in ("empty", "exists"):
        return bool(a.operand) != bool(b.operand)
    return _OPPOSITE.get(a.op) == b.op and a.operand == b.operand


def literal_kind(value: Any) -> Kind:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else None


def check_types(cond: Condition, ref_kind: Callable[[refs.Ref], Kind], report: Report) -> None:
    """Report each operator that cannot apply to a value whose kind is known at load: a literal,
    text with references in it, or a reference whose kind `ref_kind` knows (a declared input)."""

    def kind(value: Any) -> Kind:
        if isinstance(value, refs.Template):
            whole = value.whole
            return ref_kind(whole) if whole is not None else "string"
        return literal_kind(value)

    for test in tests(cond):
        # A literal operand of gt / in... is the schema's to check (a number, a list): said once.
        literal = not isinstance(test.operand, refs.Template) and test.op in (*_ORDER, "in", "not_in")
        value_kind, operand_kind = kind(test.value), None if literal else kind(test.operand)
        at_value, at_op = (*test.path, "value"), (*test.path, test.op)
        if test.op in _ORDER:
            if value_kind not in (None, "number"):
                report(f"'{test.op}' compares numbers; the value is {_kind_words(value_kind)}", at_value,
                       "compare text with equals, in or contains")
            if operand_kind not in (None, "number"):
                report(f"'{test.op}' compares numbers; got {_kind_words(operand_kind)}", at_op,
                       f"write a number: {test.op}: 0" if operand_kind == "string" else None)
        elif test.op in ("in", "not_in"):
            if operand_kind not in (None, "array"):
                report(f"'{test.op}' takes a list of values; got {_kind_words(operand_kind)}", at_op,
                       f"write {test.op}: [a, b]" + ("; for text inside text, use contains"
                                                    if operand_kind == "string" else ""))
        elif test.op == "contains":
            if value_kind not in (None, "string", "array", "object", "null"):
                report(f"'contains' looks inside text, a list or a mapping; the value is {_kind_words(value_kind)}",
                       at_value, "use equals to compare it")
            elif value_kind == "string" and operand_kind not in (None, "string"):
                report(f"'contains' on text takes text; got {_kind_words(operand_kind)}", at_op,
                       "quote it to look for it as text")
        elif test.op == "empty" and value_kind in ("number", "boolean"):
            report(f"'empty' applies to text, lists and mappings; the value is {_kind_words(value_kind)}",
                   at_value, "use exists to test for null, or equals to compare")


def _kind_words(kind: Kind) -> str:
    return {"number": "a number", "string": "text", "boolean": "true or false", "array": "a list",
            "object": "a mapping", "null": "null"}.get(kind or "", "of another kind")


# --- run time --------------------------------------------------------------------------------

def evaluate(cond: Condition, scope: refs.Scope) -> tuple[bool, str]:
    """Whether `cond` holds, and why (for a skipped step's reason). Raises ConditionError."""
    if isinstance(cond, Test):
        value, operand = _read(cond.value, scope), _read(cond.operand, scope)
        holds = _apply(cond, value, operand)
        said = f"{_written(cond.value)} {cond.op} {_written(cond.operand)}"
        shown = f" ({_written(cond.value)} is {_show(value)})" if isinstance(cond.value, refs.Template) else ""
        return holds, f"{said} is {'true' if holds else 'false'}{shown}"
    if isinstance(cond, Not):
        holds, why = evaluate(cond.item, scope)
        return not holds, f"not: {why}"
    results = [evaluate(item, scope) for item in cond.items]
    if isinstance(cond, AllOf):
        failed = [why for holds, why in results if not holds]
        return not failed, failed[0] if failed else "all: " + "; ".join(why for _, why in results)
    held = [why for holds, why in results if holds]
    return bool(held), held[0] if held else "any: none holds: " + "; ".join(why for _, why in results)


def _read(value: Any, scope: refs.Scope) -> Any:
    """A side of a test: a reference that finds nothing is null (what exists and empty test for)."""
    if not isinstance(value, refs.Template):
        return value
    try:
        return refs.resolve(value, scope)
    except refs.RefValueError:
        return None


def _same(a: Any, b: Any) -> bool:
    """YAML equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _apply(test: Test, value: Any, operand: Any) -> bool:
    op = test.op
    if op == "equals":
        return _same(value, operand)
    if op == "not_equals":
        return not _same(value, operand)
    if op == "exists":
        return (value is not None) == bool(operand)
    if op in ("in", "not_in"):
        if operand is None:
            return op == "not_in"
        if not isinstance(operand, list):
            raise ConditionError(f"'{op}' takes a list; {_written(test.operand)} is {kind_of(operand)} {_show(operand)}",
                                 "give it a list of values")
        found = any(_same(value, item) for item in operand)
        return found if op == "in" else not found
    if op in _ORDER:
        if value is None or operand is None:
            return False  # nothing is greater or smaller than a value that is not there
        for side, what in ((value, test.value), (operand, test.operand)):
            if not _number(side):
                raise ConditionError(f"'{op}' compares numbers; {_written(what)} is {kind_of(side)} {_show(side)}",
                                     "compare text with equals, in or contains")
        return {"gt": value > operand, "gte": value >= operand, "lt": value < operand, "lte": value <= operand}[op]
    if op == "contains":
        if value is None:
            return False
        if isinstance(value, str):
            if not isinstance(operand, str):
                raise ConditionError(f"'contains' on text takes text; {_written(test.operand)} is {kind_of(operand)}",
                                     "quote it to look for it as text")
            return operand in value
        if isinstance(value, list):
            return any(_same(item, operand) for item in value)
        if isinstance(value, dict):
            return isinstance(operand, str) and operand in value
        raise ConditionError(f"'contains' looks inside text, a list or a mapping; {_written(test.value)} is "
                             f"{kind_of(value)} {_show(value)}", "use equals to compare it")
    # empty
    if value is None or (isinstance(value, (str, list, dict)) and not value):
        return bool(operand)
    if isinstance(value, (str, list, dict)):
        return not operand
    raise ConditionError(f"'empty' applies to text, lists and mappings; {_written(test.value)} is "
                         f"{kind_of(value)} {_show(value)}", "use exists to test for null, or equals to compare")


def _written(value: Any) -> str:
    if isinstance(value, refs.Template):
        return value.written
    return _show(value)


def _show(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
