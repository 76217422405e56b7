"""Load-time nesting: a parallel group's branches and a `flow` step's sub-flow.

The builder (flow/build.py) calls in here at three points: `attach` after it builds a step (the
group's branches are built as full steps; the sub-flow is loaded, checked, and its inputs checked
against what the step passes), `check_group` while it checks references (each branch sees what the
steps before the group bound, never a sibling's outputs or variables; a variable bound by two
branches, or two branches that stream text, are errors), and `walk` wherever every step counts.

Sub-flows are loaded once per file version (path, size, mtime), so `validate` on a folder where many
flows call one sub-flow checks it once; a file that is already being loaded further up the chain is
a cycle, reported with its path (a.yaml -> b.yaml -> a.yaml).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import refs
from ..errors import FlowDefinitionError, did_you_mean
from ..steps import STEP_TYPES
from .inputs import InputError, coerce
from .load import PathKey
from .model import Branches, ConnectionSpec, Flow, InputSpec, StepSpec, walk

# `builder` below: flow.build's _Builder (not imported: build imports this module). It lends its
# problems, source map, `_steps`, `_check_references`, and `load` (load_flow, for sub-flows).
_Builder = Any

# The files being loaded as sub-flows now, outermost first (a contextvar: loads in threads stay apart).
_CHAIN: ContextVar[tuple[str, ...]] = ContextVar("flowrunner_subflow_chain", default=())
# Loaded sub-flows by (real path, size, mtime_ns, the --connections given): only successes are kept.
_CACHE: dict[tuple[str, int, int, int], Flow] = {}
_CACHE_LIMIT = 256


def attach(builder: _Builder, spec: StepSpec, item: dict[str, Any], inputs: dict[str, InputSpec],
           connections: dict[str, ConnectionSpec]) -> StepSpec:
    """`spec` with what it nests: a parallel group's branches, or a flow step's loaded sub-flow."""
    cls = STEP_TYPES[spec.type]
    if cls.nests:
        _check_ids(builder)
        branches = Branches(builder._steps(inputs, connections, item.get(cls.nests), spec.path) or ())  # spec.path.steps[N]
        branches.streaming = next((b.id for b in branches if streams(b)), None)
        return replace(spec, nested=branches)
    if spec.type == "flow":
        return replace(spec, nested=_subflow(builder, spec, connections))
    return spec


def _check_ids(builder: _Builder) -> None:
    """Step ids are unique across the whole flow, branches included (the builder reports duplicates
    within one list of steps; this, the rest). Once per file, and only for a file with nesting."""
    if getattr(builder, "_ids_checked", False):
        return
    builder._ids_checked = True  # type: ignore[attr-defined]
    first: dict[str, PathKey] = {}

    def visit(raw: Any, prefix: PathKey) -> None:
        if not isinstance(raw, list):
            return
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                continue
            path = (*prefix, "steps", index)
            sid, cls = item.get("id"), STEP_TYPES.get(item.get("type"))  # type: ignore[arg-type]
            if isinstance(sid, str):
                builder.all_ids.add(sid)
                if sid in first and first[sid][:-2] != prefix:  # two in one list: the builder reports those
                    line = builder.smap.location((*first[sid], "id")).line
                    builder.problem(f"duplicate step id '{sid}' (first used on line {line})", (*path, "id"),
                                    "step ids are unique across the flow, branches of parallel steps included")
                first.setdefault(sid, path)
            if cls is not None and cls.nests:
                visit(item.get(cls.nests), path)

    visit(builder.data.get("steps"), ())


def check_group(builder: _Builder, spec: StepSpec, inputs: dict[str, InputSpec],
                connections: dict[str, ConnectionSpec], bound: dict[str, str], earlier: dict[str, StepSpec]) -> None:
    """A parallel group's branches, each checked against what was bound before the group; then what
    they bind and their ids are added to `bound` and `earlier` for the steps after the group."""
    branches: tuple[StepSpec, ...] = spec.nested if isinstance(spec.nested, tuple) else ()
    if not branches:
        return
    outer_steps, outer_vars = builder.concurrent_steps, builder.concurrent_vars
    owners: dict[str, StepSpec] = {}  # variable -> the branch that binds it
    new_bound: dict[str, str] = {}
    new_earlier: dict[str, StepSpec] = {}
    streaming: StepSpec | None = None
    for branch in branches:
        others = [b for b in branches if b is not branch]
        builder.concurrent_steps = {**outer_steps, **{s.id: spec.id for b in others for s in walk([b])}}
        builder.concurrent_vars = {**outer_vars, **{var: spec.id for b in others for s in walk([b])
                                                    for var in STEP_TYPES[s.type].bindings(s)}}
        b_bound, b_earlier = dict(bound), dict(earlier)
        builder._check_references([branch], inputs, connections, b_bound, b_earlier)
        for var, setter in b_bound.items():
            if bound.get(var) == setter:
                continue  # bound before the group
            if var in owners:
                builder.problem(f"variable '{var}' is bound by two branches of parallel step '{spec.id}': "
                                f"'{owners[var].id}' and '{branch.id}'", branch.path,
                                "branches run at the same time, so which value wins would be chance; "
                                "give one of them another `result:` name")
            else:
                owners[var] = branch
            new_bound[var] = setter
        new_earlier.update({k: v for k, v in b_earlier.items() if k not in earlier})
        if streams(branch):
            if streaming is not None:
                builder.problem(f"branches '{streaming.id}' and '{branch.id}' of parallel step '{spec.id}' both "
                                "stream text to the sink; at most one branch may", branch.path,
                                "their words would interleave: set `stream: false` on one (its text is still "
                                "its output), or run it after the group")
            else:
                streaming = branch
    builder.concurrent_steps, builder.concurrent_vars = outer_steps, outer_vars
    bound.update(new_bound)
    earlier.update(new_earlier)


def _subflow(builder: _Builder, spec: StepSpec, connections: dict[str, ConnectionSpec]) -> Flow | None:
    """The sub-flow a `flow` step calls, loaded and checked; its problems are the caller's, each at
    its own file:line:col and saying where it is called from."""
    raw = spec.props.get("flow")
    if isinstance(raw, refs.Template):
        builder.problem("the sub-flow must be a file name, not a ${...} reference", (*spec.path, "flow"),
                        "sub-flows are loaded and checked with the flow, before anything runs")
        return None
    if not isinstance(raw, str) or not raw:
        return None  # the schema says what is wrong
    here = builder.smap.file
    base = Path(here).parent if not here.startswith("<") else Path(".")
    target = base / raw
    chain = (*_CHAIN.get(), os.path.realpath(here) if not here.startswith("<") else here)
    real = os.path.realpath(target)
    call_site = builder.smap.location((*spec.path, "flow"))
    if real in chain:
        cycle = [*chain[chain.index(real):], real]
        top = os.path.dirname(cycle[0])
        shown = " -> ".join(os.path.relpath(p, top) if not p.startswith("<") else p for p in cycle)
        builder.problem(f"'{raw}' calls back into a flow that is calling it: {shown}", (*spec.path, "flow"),
                        "a sub-flow may not call itself, directly or through others")
        return None
    if not target.is_file():
        what = "is a folder, not a flow file" if target.is_dir() else "does not exist"
        hint = "the path is relative to this flow's file"
        if not target.is_dir() and target.parent.is_dir():  # a typo in the name: the flow files beside it
            from ..errors import did_you_mean

            folder = os.path.dirname(raw)  # suggested as written: relative to this flow's file
            beside = sorted(os.path.join(folder, p.name) for p in target.parent.iterdir()
                            if p.suffix in (".yaml", ".yml"))[:200]
            close = did_you_mean(raw, beside)
            if close:
                hint = f"{close} ({hint})"
        builder.problem(f"the sub-flow '{raw}' {what} (looked for {target})", (*spec.path, "flow"), hint)
        return None
    token = _CHAIN.set(chain)
    try:
        sub = _load(builder.load, target, real, builder.extra)
    except FlowDefinitionError as e:
        for p in e.problems:
            where = f"in the sub-flow called from {call_site}"
            builder.problems.append(replace(p, hint=f"{p.hint}; {where}" if p.hint else where))
        builder.problem(f"the sub-flow '{raw}' has {len(e.problems)} problem(s) (reported at their places)",
                        (*spec.path, "flow"))
        return None
    finally:
        _CHAIN.reset(token)
    _merge_connections(builder, spec, sub, connections)
    _check_inputs(builder, spec, sub, raw)
    return sub


def _load(load_flow: Any, target: Path, real: str, extra: dict[str, ConnectionSpec]) -> Flow:
    try:
        st = os.stat(real)
    except OSError:
        return load_flow(target, extra)  # read_text reports a missing or unreadable file
    key = (real, st.st_size, st.st_mtime_ns, id(extra) if extra else 0)
    flow = _CACHE.get(key)
    if flow is None:
        flow = load_flow(target, extra)
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = flow
    return flow


def _merge_connections(builder: _Builder, spec: StepSpec, sub: Flow, connections: dict[str, ConnectionSpec]) -> None:
    """One pool per run: the sub-flow's connections join the caller's by name. A name both declare is
    the caller's connection (its settings win); declared with another type, it is an error."""
    for name, conn in sub.connections.items():
        mine = connections.get(name)
        if mine is None:
            connections[name] = conn
        elif mine.type != conn.type:
            theirs = conn.source.location(conn.path) if conn.source else None
            builder.problem(f"the sub-flow's connection '{name}' is a {conn.type} connection"
                            f"{f' ({theirs})' if theirs else ''}, but this flow's '{name}' is a {mine.type}",
                            (*spec.path, "flow"),
                            "a sub-flow uses its caller's connection of the same name: rename one of them")


def _check_inputs(builder: _Builder, spec: StepSpec, sub: Flow, raw: str) -> None:
    given = spec.props.get("inputs") or {}
    if not isinstance(given, dict):
        return
    path = (*spec.path, "inputs")
    for name, value in given.items():
        declared = sub.inputs.get(name)
        if declared is None:
            builder.problem(f"unknown input '{name}' of the sub-flow '{raw}'", (*path, name),
                            did_you_mean(name, sub.inputs) or f"its inputs: {', '.join(sub.inputs) or 'none'}",
                            key=True)
        elif not isinstance(value, refs.Template) and value is not None:
            try:
                coerce(declared, value, from_text=False)
            except InputError as e:
                builder.problem(f"input '{name}' of the sub-flow '{raw}': {e.reason}", (*path, name),
                                f"it is declared as {declared.type}")
    for name, declared in sub.inputs.items():
        if name not in given and not declared.has_default:
            builder.problem(f"missing required input '{name}' of the sub-flow '{raw}'",
                            path if "inputs" in spec.props else spec.path,
                            f"pass it: inputs: {{{name}: ...}}" + (f" ({declared.description})" if declared.description else ""))


def streams(spec: StepSpec) -> bool:
    """Whether a step may send text to the sink: its type says (Step.streams); a parallel group or a
    sub-flow when one of its steps does."""
    if isinstance(spec.nested, tuple):
        return any(streams(b) for b in spec.nested)
    if isinstance(spec.nested, Flow):
        return any(streams(s) for s in spec.nested.steps)
    return STEP_TYPES[spec.type].streams(spec)


__all__ = ["attach", "check_group", "streams", "walk"]
