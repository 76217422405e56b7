"""Flow file -> Flow model, collecting every schema and reference problem of the file at once."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

from .. import refs
from ..connections.registry import CONNECTION_TYPES, connection_problem
from ..errors import FlowDefinitionError, Problem, did_you_mean
from ..steps import STEP_TYPES
from .inputs import InputError, coerce
from .load import PathKey, SourceMap, format_path, parse_yaml, read_text
from . import control, nested
from .model import INPUT_TYPES, ConnectionSpec, Flow, InputSpec, RetrySpec, StepSpec, frozen
from .schema import schema_problems

COMMON_KEYS = {"id", "type", "title", "description", "timeout", "retry", "run_on_failure",
               "when", "for_each", "concurrency", "on_item_failure"}  # the last four: conditions.py, foreach.py
LOOP_NAMES = ("item", "item_index")  # the variables a for_each step's properties see
# A "did you mean" hint compares the misspelt name with at most SUGGEST_FROM names (the nearest ones),
# and one file's hints with at most SUGGEST_BUDGET names in all: checking a generated flow of
# thousands of steps, each with a bad reference, stays linear (hints are a courtesy, not a check).
SUGGEST_FROM = 200
SUGGEST_BUDGET = 50_000


def load_flow(file: str | Path, connections: dict[str, ConnectionSpec] | None = None) -> Flow:
    """Load and check a flow file. `connections` (from --connections FILE) override the flow's own."""
    return load_flow_text(read_text(file), str(file), connections)


def load_flow_with(file: str | Path, connections_file: str | Path | None) -> Flow:
    """A flow as the commands take it: FLOW plus the connections of `--connections FILE`, if given.
    Its load-time warnings (flow/guards.py) go to stderr, as `validate` prints them."""
    flow = load_flow(file, load_connections_file(connections_file, "--connections") if connections_file else None)
    if flow.warnings:
        import click

        for warning in flow.warnings:
            click.echo("Warning: " + warning.format(), err=True)
    return flow


def load_flow_text(text: str, file: str = "<string>", connections: dict[str, ConnectionSpec] | None = None) -> Flow:
    data, smap = parse_yaml(text, file)
    problems = schema_problems(data, smap)
    flow = None
    if isinstance(data, dict):
        builder = _Builder(data, smap, connections or {}, _steps_with_problems(problems))
        flow = builder.build()
        seen = set(problems)
        problems += [p for p in builder.problems if p not in seen]
    else:
        problems = problems or [Problem("a flow file must be a mapping", smap.location(()))]
    if problems or flow is None:
        problems.sort(key=lambda p: (p.location.line or 0, p.location.col or 0) if p.location else (0, 0))
        raise FlowDefinitionError(problems)
    return flow


class _Builder:
    """Tolerant of data that failed the schema: it checks what it can, so one run shows all problems."""

    load = staticmethod(load_flow)  # how flow/nested.py loads a sub-flow (it cannot import this module)

    def __init__(self, data: dict[str, Any], smap: SourceMap, extra: dict[str, ConnectionSpec] | None = None,
                 misshapen: frozenset[str] = frozenset()) -> None:
        self.data, self.smap = data, smap
        self.extra = extra or {}
        # Steps the schema found wrong: their references are still checked, but a step type's own
        # check() is written for well-formed properties, so it never sees these.
        self.misshapen = misshapen
        self.problems: list[Problem] = []
        self.all_ids = _all_ids(data)
        self.suggest_budget = SUGGEST_BUDGET
        # While a parallel group's branch is checked: its siblings' step ids and variables (-> the group's
        # id), which it may not read (flow/nested.py).
        self.concurrent_steps: dict[str, str] = {}
        self.concurrent_vars: dict[str, str] = {}

    def problem(self, message: str, path: PathKey, hint: str | None = None, *, key: bool = False) -> None:
        self.problems.append(Problem(message, self.smap.location(path, key=key), format_path(path), hint))

    def build(self) -> Flow | None:
        inputs = self._inputs()
        connections = {**self._connections(), **self.extra}
        steps = self._steps(inputs, connections)
        # Which step sets each variable: for "set later" errors in steps, and for the outputs.
        self.setter = {var: s.id for s in nested.walk(steps or ()) for var in STEP_TYPES[s.type].bindings(s)}
        self._check_references(steps or [], inputs, connections)
        outputs = self._outputs(inputs, steps)
        name = self.data.get("name")
        if self.problems or not isinstance(name, str) or steps is None:
            return None
        warnings = control.load_warnings(steps, self.smap)
        return Flow(
            name=name,
            version=1,
            file=self.smap.file,
            description=self.data.get("description"),
            inputs=frozen(inputs),
            connections=frozen(connections),
            steps=tuple(steps),
            outputs=frozen(outputs),
            source=self.smap,
            warnings=tuple(warnings),
        )

    def _inputs(self) -> dict[str, InputSpec]:
        raw = self.data.get("inputs") or {}
        out: dict[str, InputSpec] = {}
        if not isinstance(raw, dict):
            return out
        for name, decl in raw.items():
            if not isinstance(decl, dict) or decl.get("type", "string") not in INPUT_TYPES:
                continue
            spec = InputSpec(name, decl.get("type", "string"), decl.get("default"), "default" in decl,
                             decl.get("description"), tuple(decl["enum"]) if isinstance(decl.get("enum"), list) else None)
            if spec.has_default and spec.default is not None:
                try:
                    coerce(spec, spec.default, from_text=False)
                except InputError as e:
                    self.problem(f"default does not fit: {e.reason}", ("inputs", name, "default"))
            out[name] = spec
        return out

    def _compile(self, value: Any, path: PathKey) -> Any:
        """Parse references in every string of `value`; syntax errors become problems."""
        if isinstance(value, str):
            try:
                return refs.parse(value)
            except refs.RefSyntaxError as e:
                where = self.smap.find_in_value(path, e.fragment)
                self.problems.append(Problem(e.message, where, format_path(path), e.hint))
                return value
        if isinstance(value, dict):
            return {k: self._compile(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._compile(v, (*path, i)) for i, v in enumerate(value)]
        return value

    def _connections(self) -> dict[str, ConnectionSpec]:
        raw = self.data.get("connections") or {}
        out: dict[str, ConnectionSpec] = {}
        if not isinstance(raw, dict):
            return out
        for name, decl in raw.items():
            if not isinstance(decl, dict) or not isinstance(decl.get("type"), str) or decl["type"] not in CONNECTION_TYPES:
                continue
            path = ("connections", name)
            config = self._compile({k: v for k, v in decl.items() if k != "type"}, path)
            for ref_path, ref in refs.found_in(config, path):
                if ref.kind != "env":
                    self._ref_problem(ref, ref_path, f"{ref.text}: connections may only use ${{env.NAME}}",
                                      "connections are opened before any step runs; pass other values to steps")
                elif len(ref.path) != 1:
                    self._ref_problem(ref, ref_path, f"{ref.text}: an environment variable is text; nothing is "
                                      "inside it", f"write ${{env.{ref.name}}}")
            out[name] = ConnectionSpec(name, decl["type"], frozen(config), path, self.smap)
        return out

    def _steps(self, inputs: dict[str, InputSpec], connections: dict[str, ConnectionSpec],
               raw: Any = None, prefix: PathKey = ()) -> list[StepSpec] | None:
        """The steps of the file, or (`prefix`: a parallel group's path) the branches `raw` of a group."""
        raw = raw if prefix else self.data.get("steps")
        if not isinstance(raw, list):
            return None
        specs: list[StepSpec] = []
        first_seen: dict[str, int] = {}
        for index, item in enumerate(raw):
            if (not isinstance(item, dict) or not isinstance(item.get("id"), str)
                    or not isinstance(item.get("type"), str) or item["type"] not in STEP_TYPES):
                continue
            path: PathKey = (*prefix, "steps", index)
            sid = item["id"]
            if sid in first_seen:
                line = self.smap.location((*prefix, "steps", first_seen[sid], "id")).line
                self.problem(f"duplicate step id '{sid}' (first used on line {line})", (*path, "id"),
                             "step ids must be unique; rename one")
                continue
            first_seen[sid] = index
            inner = STEP_TYPES[item["type"]].nests  # parallel's `steps`: built as steps by nested.attach
            props = {k: self._compile(v, (*path, k)) for k, v in item.items() if k not in COMMON_KEYS and k != inner}
            specs.append(StepSpec(
                id=sid, type=item["type"], index=index, props=frozen(props),
                title=item.get("title"), description=item.get("description"),
                timeout=self._compile(item.get("timeout"), (*path, "timeout")),
                retry=_retry(item.get("retry")), run_on_failure=item.get("run_on_failure") is True,
                location=self.smap.location(path), prefix=prefix, **control.fields(self, item, path),
            ))
            if inner or item["type"] == "flow":  # a group's branches, a sub-flow
                specs[-1] = nested.attach(self, specs[-1], item, inputs, connections)
        return specs

    def _check_references(self, specs: list[StepSpec], inputs: dict[str, InputSpec],
                          connections: dict[str, ConnectionSpec], bound: dict[str, str] | None = None,
                          earlier: dict[str, StepSpec] | None = None) -> None:
        """`bound` and `earlier` (updated in place): what the steps before `specs` bound and are; a
        parallel group's branches are checked through here with what was known before the group."""
        setter = self.setter
        bound = {} if bound is None else bound
        earlier = {} if earlier is None else earlier
        for spec in specs:
            cls = STEP_TYPES[spec.type]
            values: list[tuple[PathKey, refs.Ref]] = list(refs.found_in(dict(spec.props), spec.path))
            values += list(refs.found_in(spec.timeout, (*spec.path, "timeout")))
            # `when` and `for_each` are read once, before any item: only the rest sees ${item}.
            for path, ref in control.control_refs(spec):
                self._check_ref(ref, path, spec, inputs, bound, earlier, setter)
            inner = {**bound, **dict.fromkeys(LOOP_NAMES, spec.id)} if spec.for_each is not None else bound
            for path, ref in values:
                self._check_ref(ref, path, spec, inputs, inner, earlier, setter)
            if spec.when is not None:
                control.check_condition(self, spec, inputs, bound, earlier)
            if spec.for_each is not None:
                control.check_for_each(self, spec, inputs)
            if cls.connection_types and isinstance(spec.props.get("connection"), str):
                self._check_connection(spec, cls.connection_types, connections)
            if format_path(spec.path) not in self.misshapen:
                self.problems += cls.check(spec, _PartialFlow(inputs, connections, specs, self.smap))
            if isinstance(spec.nested, tuple):
                nested.check_group(self, spec, inputs, connections, inner, earlier)  # a looped group's see ${item}
                bound.update((var, setter) for var, setter in inner.items() if var not in LOOP_NAMES)
            for var in cls.bindings(spec):
                bound[var] = spec.id
            earlier[spec.id] = spec

    def _check_connection(self, spec: StepSpec, allowed: tuple[str, ...], connections: dict[str, ConnectionSpec]) -> None:
        found = connection_problem(spec.props["connection"], allowed, {n: c.type for n, c in connections.items()},
                                   f"a {spec.type} step")
        if found:
            self.problem(found[0], (*spec.path, "connection"), found[1])

    def _check_ref(self, ref: refs.Ref, path: PathKey, spec: StepSpec | None, inputs: dict[str, InputSpec],
                   bound: dict[str, str], earlier: dict[str, StepSpec], setter: dict[str, str]) -> None:
        kind, name = ref.kind, ref.name
        if kind == "env":
            self._ref_problem(ref, path, f"{ref.text}: ${{env.*}} is only allowed in connections",
                              f"declare an input and pass it: -i {name.lower()}=\"${name}\"")
        elif kind == "inputs":
            if name not in inputs:
                self._ref_problem(ref, path, f"{ref.text}: unknown input '{name}'",
                                  self._suggest(name, inputs) or "declare it under inputs:")
        elif kind == "steps":
            field = str(ref.path[1])
            if name not in earlier:
                if spec is not None and name == spec.id:
                    msg, hint = f"{ref.text}: a step cannot use its own outputs", None
                elif name in self.concurrent_steps:
                    msg, hint = (f"{ref.text}: step '{name}' runs at the same time as this one (both are in "
                                 f"parallel step '{self.concurrent_steps[name]}')",
                                 "read it after the parallel step, or put the two steps in one branch")
                elif name in self.all_ids:
                    msg, hint = f"{ref.text}: step '{name}' runs after this one", "a step can only use outputs of earlier steps"
                else:
                    msg, hint = f"{ref.text}: unknown step '{name}'", self._suggest(name, earlier)
                self._ref_problem(ref, path, msg, hint)
            else:
                target = earlier[name]
                outputs = STEP_TYPES[target.type].declared_outputs(target)
                if target.for_each is not None:  # each output is the list of the items' values
                    outputs = (*outputs, "errors")
                if field not in outputs:
                    self._ref_problem(ref, path, f"{ref.text}: step '{name}' has no output '{field}'",
                                      self._suggest(field, outputs) or f"its outputs: {', '.join(outputs)}")
                elif len(ref.path) > 2 and target.for_each is None:
                    self._check_shape(ref, path, target, field, ref.path[2:])
        elif name not in bound:
            if name in self.concurrent_vars:
                self._ref_problem(ref, path, f"{ref.text}: variable '{name}' is set by another branch of parallel "
                                  f"step '{self.concurrent_vars[name]}', which runs at the same time",
                                  "read it after the parallel step, or put the two steps in one branch")
            elif name in setter:
                self._ref_problem(ref, path, f"{ref.text}: variable '{name}' is set by step '{setter[name]}', "
                                  "which runs later", "move that step before this one")
            elif name in LOOP_NAMES:
                looped = spec is not None and spec.for_each is not None
                self._ref_problem(ref, path, f"{ref.text}: there is no item here",
                                  "`when` and `for_each` are read once, before the items; ${item} is for the "
                                  "step's other properties" if looped else
                                  "${item} and ${item_index} exist inside a step with for_each: ${list}")
            else:
                hint = self._suggest(name, bound)
                if name in inputs:
                    hint = f"did you mean ${{inputs.{name}}}?"
                self._ref_problem(ref, path, f"{ref.text}: unknown variable '{name}'",
                                  hint or "variables are set by an earlier step's `result:` or a `set` step")
        elif ref.path and bound[name] in earlier and earlier[bound[name]].for_each is None:
            target = earlier[bound[name]]
            output = STEP_TYPES[target.type].bindings(target).get(name)
            if output is not None:
                self._check_shape(ref, path, target, output, ref.path)

    def _check_shape(self, ref: refs.Ref, path: PathKey, target: StepSpec, output: str,
                     inner: tuple[str | int, ...]) -> None:
        """A path inside an output whose shape the step type declares (Step.output_shape)."""
        from .shapes import undeclared

        if getattr(target, "for_each", None) is not None:
            return  # its outputs are lists, one item per run: the shape is an item's
        shape = STEP_TYPES[target.type].output_shape(target, output, _PartialFlow({}, {}, [], self.smap))
        found = undeclared(shape, inner) if shape is not None else None
        if found is None:
            return
        depth, field, known = found
        inside = output + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inner[:depth])
        hint = self._suggest(field, known) or (f"it declares: {', '.join(known)}" if known
                                                else "the schema declares no fields there")
        self._ref_problem(ref, path, f"{ref.text}: the schema of step '{target.id}' declares no '{field}' in "
                          f"its {inside}", hint)

    def _ref_problem(self, ref: refs.Ref, path: PathKey, message: str, hint: str | None) -> None:
        self.problems.append(Problem(message, self.smap.find_in_value(path, ref.text), format_path(path), hint))

    def _suggest(self, word: str, names: Iterable[str]) -> str | None:
        """did_you_mean() over the nearest SUGGEST_FROM names (the last declared or bound)."""
        nearest = list(islice(reversed(names), SUGGEST_FROM)) if isinstance(names, dict) else list(names)[-SUGGEST_FROM:]
        if len(nearest) > self.suggest_budget:
            return None
        self.suggest_budget -= len(nearest)
        return did_you_mean(word, nearest)

    def _outputs(self, inputs: dict[str, InputSpec], steps: list[StepSpec] | None) -> dict[str, Any]:
        raw = self.data.get("outputs") or {}
        if not isinstance(raw, dict):
            return {}
        compiled = self._compile(raw, ("outputs",))
        earlier = {s.id: s for s in nested.walk(steps or ())}
        for path, ref in refs.found_in(compiled, ("outputs",)):
            self._check_ref(ref, path, None, inputs, self.setter, earlier, self.setter)
        return compiled


class _PartialFlow:
    """What a step type's own check() may look at while the flow is still being built."""

    def __init__(self, inputs: dict[str, InputSpec], connections: dict[str, ConnectionSpec],
                 steps: list[StepSpec], source: SourceMap | None = None) -> None:
        self.inputs, self.connections, self.steps = inputs, connections, steps
        self.source = source  # for problems inside a property (source.location(path)), as on a Flow


def _steps_with_problems(problems: list[Problem]) -> frozenset[str]:
    """The paths of the steps that schema problems point into (`steps[N]`, and a parallel group's
    branch `steps[N].steps[M]`: the group and the branch)."""
    out = set()
    for p in problems:
        prefix = ""
        for part in p.path.split("."):
            index = part[6:-1] if part.startswith("steps[") and part.endswith("]") else ""
            if not index.isdigit():
                break
            prefix = f"{prefix}.{part}" if prefix else part
            out.add(prefix)
    return frozenset(out)


def _all_ids(data: dict[str, Any]) -> set[str]:
    steps = data.get("steps")
    return {s["id"] for s in steps if isinstance(s, dict) and isinstance(s.get("id"), str)} if isinstance(steps, list) else set()


def _retry(raw: Any) -> RetrySpec:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return RetrySpec(attempts=raw)
    if isinstance(raw, dict):
        return RetrySpec(**{k: raw[k] for k in ("attempts", "backoff", "max_backoff") if k in raw})
    return RetrySpec()


def load_connections_file(file: str | Path, option: str = "") -> dict[str, ConnectionSpec]:
    """A YAML file with a top-level `connections:` mapping, as in a flow (for secrets kept apart).
    `option`: the command-line option that named it, for its errors (see read_text)."""
    from .schema import connections_file_problems

    data, smap = parse_yaml(read_text(file, option), str(file))
    problems = connections_file_problems(data, smap)
    if not problems and isinstance(data, dict):
        builder = _Builder(data, smap)
        specs = builder._connections()
        problems = builder.problems
        if not problems:
            return specs
    raise FlowDefinitionError(problems or [Problem("expected a mapping with `connections:`", smap.location(()))])
