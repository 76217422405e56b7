"""Load time for a step's control options (`when`, `for_each`, `concurrency`, `on_item_failure`):
what the builder (flow/build.py) puts on a StepSpec, the type check of its condition, the references
they read, and the flow's load-time warnings. The conditions themselves are flowrunner/conditions.py,
imported only for a flow that has one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from .. import refs
from ..errors import Problem
from .load import PathKey, SourceMap
from .model import Flow, InputSpec, StepSpec, walk


class _Builder(Protocol):
    """What this module uses of flow/build.py's builder (which imports this module)."""

    def problem(self, message: str, path: PathKey, hint: str | None = None, *, key: bool = False) -> None: ...
    def _compile(self, value: Any, path: PathKey) -> Any: ...


def fields(builder: _Builder, item: dict[str, Any], path: PathKey) -> dict[str, Any]:
    """A step's `when`, `for_each`, `concurrency` and `on_item_failure`, for its StepSpec."""
    out: dict[str, Any] = {}
    if "when" in item:
        from .. import conditions  # only for flows that have conditions: validate's start-up

        out["when"] = conditions.parse(item["when"], (*path, "when"), builder._compile, _reporter(builder))
    if "for_each" in item:
        out["for_each"] = builder._compile(item["for_each"], (*path, "for_each"))
    else:
        for key in ("concurrency", "on_item_failure"):
            if key in item:
                builder.problem(f"{key} applies to a step with for_each; this one has none", (*path, key),
                                "add for_each: ${list}, or remove it", key=True)
    if isinstance(item.get("concurrency"), int) and not isinstance(item["concurrency"], bool):
        out["concurrency"] = max(1, item["concurrency"])  # below 1: the schema's error
    if item.get("on_item_failure") in ("fail", "continue"):
        out["on_item_failure"] = item["on_item_failure"]
    return out


def check_condition(builder: _Builder, spec: StepSpec, inputs: dict[str, InputSpec], bound: dict[str, str],
                    earlier: dict[str, StepSpec]) -> None:
    """An operator that cannot apply to a value whose kind is known here: a declared input's, and a
    for_each step's outputs and variable (lists)."""
    from .. import conditions

    def ref_kind(ref: refs.Ref) -> str | None:
        if ref.kind == "inputs" and len(ref.path) == 1 and ref.name in inputs:
            kind = inputs[ref.name].type
            return "number" if kind == "integer" else kind
        target = earlier.get(bound.get(ref.name, "")) if ref.kind == "var" and not ref.path else (
            earlier.get(ref.name) if ref.kind == "steps" and len(ref.path) == 2 else None)
        return "array" if target is not None and target.for_each is not None else None

    conditions.check_types(spec.when, ref_kind, _reporter(builder))


def check_for_each(builder: _Builder, spec: StepSpec, inputs: dict[str, InputSpec]) -> None:
    """`for_each` over a declared input of another type than array (a literal that is not a list is
    the schema's error)."""
    whole = spec.for_each.whole if isinstance(spec.for_each, refs.Template) else None
    declared = inputs.get(whole.name) if whole is not None and whole.kind == "inputs" and len(whole.path) == 1 else None
    if declared is not None and declared.type != "array":
        builder.problem(f"for_each takes a list; {whole.text} is the input '{whole.name}', declared {declared.type}",
                        (*spec.path, "for_each"), "declare the input `type: array`, or loop over a list")


def _reporter(builder: _Builder) -> Any:
    def report(message: str, at: PathKey, hint: str | None = None, key: bool = False) -> None:
        builder.problem(message, at, hint, key=key)

    return report


def step_refs(spec: StepSpec) -> Iterator[tuple[PathKey, refs.Ref]]:
    """The references a step reads when it runs, its `when` aside."""
    yield from refs.found_in(dict(spec.props), spec.path)
    yield from refs.found_in(spec.timeout, (*spec.path, "timeout"))
    yield from refs.found_in(spec.for_each, (*spec.path, "for_each"))


def control_refs(spec: StepSpec) -> Iterator[tuple[PathKey, refs.Ref]]:
    """The references in a step's `for_each` and `when` (read once, before any item: no ${item})."""
    yield from refs.found_in(spec.for_each, (*spec.path, "for_each"))
    if spec.when is not None:
        from ..conditions import tests

        for test in tests(spec.when):
            yield from refs.found_in(test.value, (*test.path, "value"))
            yield from refs.found_in(test.operand, (*test.path, test.op))


def load_warnings(steps: list[StepSpec], smap: SourceMap) -> list[Problem]:
    """What `validate` (and every command that loads the flow) warns of: reads of a possibly skipped
    step's output (flow/guards.py), and its sub-flows' own warnings, each at its own file:line:col."""
    warnings: list[Problem] = []
    if any(s.when is not None for s in walk(steps)):
        from .guards import skipped_reads

        warnings = skipped_reads(walk(steps), smap, step_refs)
    for sub in {id(s.nested): s.nested for s in walk(steps) if isinstance(s.nested, Flow)}.values():
        warnings += [w for w in sub.warnings if w not in warnings]
    return warnings
