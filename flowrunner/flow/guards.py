"""Load-time warnings about skipped steps: a step that reads what a step with a `when` produces,
although that step may have been skipped (its outputs and variable are then null).

The rule (README "Control flow"): a reference to `${steps.S.X}`, where S has a `when` (its own, or
that of the parallel step it is a branch of), warns unless
the reading step is guarded: its own `when` is S's (as written, or one item of an `all:`), or tests
that very value with `exists: true` (or `empty: false`). A variable warns only when every step that
set it before has a `when`, no two of those conditions are complementary (C and {not: C}; equals and
not_equals, gt and lte, ... of the same value: one of them always runs), and the reader is not guarded
by one of them or an `exists` test on it. References inside a `when` never warn: conditions read a
missing value as null. Only called for flows that have a `when` somewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .. import conditions, refs
from ..errors import Problem
from ..steps import STEP_TYPES
from .load import PathKey, SourceMap, format_path
from .model import StepSpec, walk


def skipped_reads(steps: Iterable[StepSpec], smap: SourceMap,
                  refs_of: Callable[[StepSpec], Iterator[tuple[PathKey, refs.Ref]]]) -> list[Problem]:
    """One located warning per reference (per step) that may read a skipped step's null.
    `refs_of(spec)`: the (path, Ref) pairs of the step's properties, timeout and for_each."""
    conditional: dict[str, StepSpec] = {}  # step id -> the step whose `when` may skip it
    binders: dict[str, list[StepSpec]] = {}
    warnings: list[Problem] = []
    owner: dict[str, StepSpec] = {}  # a branch of a parallel step with a `when`: skipped with that step
    for spec in steps:
        if spec.when is not None and isinstance(spec.nested, tuple):
            for branch in walk(spec.nested):
                owner.setdefault(branch.id, spec)
        skipped_by = spec if spec.when is not None else owner.get(spec.id)
        guards = conditions.conjuncts(spec.when) if spec.when is not None else []
        seen: set[str] = set()
        for path, ref in refs_of(spec):
            if ref.text in seen:
                continue
            message = _risk(ref, guards, conditional, binders)
            if message:
                seen.add(ref.text)
                warnings.append(Problem(message[0], smap.find_in_value(path, ref.text), format_path(path),
                                        message[1]))
        for var in STEP_TYPES[spec.type].bindings(spec):
            binders.setdefault(var, []).append(skipped_by or spec)
        if skipped_by is not None:
            conditional[spec.id] = skipped_by
    return warnings


def _risk(ref: refs.Ref, guards: list[conditions.Condition], conditional: dict[str, StepSpec],
          binders: dict[str, list[StepSpec]]) -> tuple[str, str] | None:
    hint = ("give this step the same `when`, or when: {value: \"" + ref.text + "\", exists: true}; "
            "or set a default in an earlier step")
    if ref.kind == "steps":
        source = conditional.get(ref.name)
        if source is None or source.when in guards or _tests_exists(guards, ref):
            return None
        step = (f"step '{source.id}'" if source.id == ref.name else
                f"step '{ref.name}' is a branch of parallel step '{source.id}', which")
        return (f"{ref.text}: {step} has a `when`; when it is skipped, this reads null", hint)
    if ref.kind != "var" or ref.root not in binders:
        return None
    setters = binders[ref.root]
    if any(s.when is None for s in setters):
        return None
    whens = [s.when for s in setters]
    if any(conditions.complementary(a, b) for i, a in enumerate(whens) for b in whens[i + 1:]):
        return None
    if any(w in guards for w in whens) or _tests_exists(guards, ref):
        return None
    names = ", ".join(f"'{s.id}'" for s in setters)
    return (f"{ref.text}: variable '{ref.root}' is set only by step(s) with a `when` ({names}); when they are "
            "skipped, this reads null", hint)


def _tests_exists(guards: list[conditions.Condition], ref: refs.Ref) -> bool:
    """A guard {value: <the same step or variable>, exists: true} (or empty: false)."""
    for guard in guards:
        if not isinstance(guard, conditions.Test) or not isinstance(guard.value, refs.Template):
            continue
        whole = guard.value.whole
        if whole is None or whole.root != ref.root or (ref.kind == "steps" and whole.name != ref.name):
            continue
        if (guard.op == "exists" and guard.operand is True) or (guard.op == "empty" and guard.operand is False):
            return True
    return False
