"""A step's `when` and `for_each`, around the engine's run of a step (engine.Run._run_step calls in
here for a step that has either, and this calls back there, `plain`, for the step or each item).

`when` is decided once, before anything else: false, the step ends `skipped` with the reason, its
outputs null and its result variable null unless an earlier step set it (a skipped step never
overwrites a value). `for_each` runs the step once per item of a list, `concurrency` items at a
time, each item with its own retries and timeout; `${item}` and `${item_index}` resolve inside it
(a contextvar: the item's task, and the tasks it starts, see it). The events of item N reach the
caller only after those of item N-1: the first unfinished item streams live, the ones after it are
buffered, so a looped chat step's text is never interleaved. The step's outputs are lists, in input
order; `errors` lists {index, error} of the failed items."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from . import refs, secrets
from .errors import FlowError, FlowRuntimeError, Problem
from .events import Event, StepFinished, StepStarted, Warning
from .steps import STEP_TYPES

if TYPE_CHECKING:
    from .flow.model import StepSpec


class Run(Protocol):
    """What this module uses of engine.Run (the engine imports this module, not the other way)."""

    variables: dict[str, Any]
    step_outputs: dict[str, dict[str, Any]]
    skipped: set[str]
    errors: list[FlowError]
    interrupted: bool
    grace_on_cancel: bool
    interruption: FlowError | None

    def scope(self) -> refs.Scope: ...
    def _run_step(self, spec: StepSpec, *, plain: bool = False) -> AsyncIterator[Event]: ...
    def _bind(self, spec: StepSpec, cls: Any, outputs: dict[str, Any]) -> None: ...
    def _failure(self, spec: StepSpec, message: str, hint: str | None, attempts: int) -> FlowRuntimeError: ...
    def _interrupt(self) -> None: ...

log = structlog.get_logger("flowrunner")


class Item:
    """One item of a for_each step while it runs: what the engine fills in when it ends."""

    def __init__(self, run: Run, spec: StepSpec, index: int, value: Any) -> None:
        self.run, self.spec, self.index = run, spec, index
        self.variables = {"item": value, "item_index": index}
        self.outputs: dict[str, Any] = {}
        self.failure: FlowError | None = None


_ITEM: ContextVar[Item | None] = ContextVar("flowrunner_item", default=None)
_DONE = object()  # an item's queue ends with it


def current(run: Run, spec: StepSpec) -> Item | None:
    """The item of `spec` that this task runs, if it runs one (a step nested in it runs as a step)."""
    item = _ITEM.get()
    return item if item is not None and item.run is run and item.spec is spec else None


def variables(run: Run) -> dict[str, Any] | None:
    """${item} and ${item_index} for what `run` resolves in this task (a sub-flow's run sees none)."""
    item = _ITEM.get()
    return item.variables if item is not None and item.run is run else None


def null_outputs(spec: StepSpec) -> dict[str, Any]:
    names = STEP_TYPES[spec.type].declared_outputs(spec)
    return dict.fromkeys((*names, "errors") if spec.for_each is not None else names)


def skip(run: Run, spec: StepSpec, reason: str) -> StepFinished:
    """The step does not run: its outputs read null, and so does its variable, unless set before; a
    parallel step's branches likewise (a later step may read them)."""
    from .flow.model import walk

    outputs = null_outputs(spec)
    for each in walk([spec]):
        run.step_outputs[each.id] = outputs if each is spec else null_outputs(each)
        run.skipped.add(f"steps.{each.id}")
        for var in STEP_TYPES[each.type].bindings(each):
            if var not in run.variables:
                run.variables[var] = None
                run.skipped.add(var)
    log.info("step skipped", reason=secrets.redact(reason))
    return StepFinished(spec.id, "skipped", outputs, reason=reason)


def _fail(run: Run, spec: StepSpec, message: str, hint: str | None, started: float) -> StepFinished:
    failure = run._failure(spec, message, hint, 1)
    run.errors.append(failure)
    log.error("step failed", error=secrets.redact(failure.message))
    return StepFinished(spec.id, "failed", {}, secrets.redact(str(failure)), time.monotonic() - started)


async def controlled(run: Run, spec: StepSpec) -> AsyncIterator[Event]:
    structlog.contextvars.bind_contextvars(step=spec.id)
    try:
        async with aclosing(_controlled(run, spec)) as events:
            async for event in events:
                yield event
    finally:
        structlog.contextvars.unbind_contextvars("step")


async def _controlled(run: Run, spec: StepSpec) -> AsyncIterator[Event]:
    started = time.monotonic()
    scope = run.scope()
    scope.missing_is_null = bool(run.errors)  # a run_on_failure step after a failure
    if spec.when is not None:
        from .conditions import ConditionError, evaluate

        try:
            holds, reason = evaluate(spec.when, scope)
        except ConditionError as e:
            yield _fail(run, spec, f"when: {e.message}", e.hint, started)
            return
        if not holds:
            yield skip(run, spec, f"when: {reason}")
            return
    if spec.for_each is None:
        async with aclosing(run._run_step(spec, plain=True)) as events:
            async for event in events:
                yield event
        return
    try:
        items = refs.resolve(spec.for_each, scope)
    except refs.RefValueError as e:
        yield _fail(run, spec, f"for_each: {e}", "the reference resolved to nothing at run time", started)
        return
    if not isinstance(items, list):
        yield _fail(run, spec, f"for_each takes a list; {_written(spec.for_each)} is {refs.kind_of(items)} "
                    f"{secrets.shorten(refs.to_text(items), 60)!r}",
                    "give it a list, e.g. ${passages} or [a, b]", started)
        return
    yield StepStarted(spec.id, spec.type, spec.title, 1, items=len(items))
    log.info("step started", type=spec.type, items=len(items))
    async with aclosing(_items(run, spec, items, started)) as events:
        async for event in events:
            yield event


async def _items(run: Run, spec: StepSpec, values: list[Any], started: float) -> AsyncIterator[Event]:
    items = [Item(run, spec, i, v) for i, v in enumerate(values)]
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in items]
    pending = iter(items)  # shared by the workers: each takes the next item, in input order
    stop = False  # an item failed and the step fails: items not started yet do not run

    async def worker() -> None:
        nonlocal stop
        for item in pending:
            try:
                if stop:
                    continue
                _ITEM.set(item)
                structlog.contextvars.bind_contextvars(item=item.index)
                async with aclosing(run._run_step(spec, plain=True)) as events:
                    async for event in events:
                        queues[item.index].put_nowait(event)
                if item.failure is not None and spec.on_item_failure == "fail":
                    stop = True
            except Exception as e:  # a bug: the item fails, the other items still end (their queues too)
                item.failure = FlowRuntimeError(Problem(f"{spec.label} item {item.index} failed: unexpected "
                                                        f"error: {type(e).__name__}: {e}", spec.location))
                stop = stop or spec.on_item_failure == "fail"
            finally:
                queues[item.index].put_nowait(_DONE)

    workers = [asyncio.create_task(worker(), name=f"flowrunner {spec.id} items")
               for _ in range(min(spec.concurrency, len(items)))]
    interrupted = False
    try:
        for queue in queues:
            while (event := await queue.get()) is not _DONE:
                yield event
    except asyncio.CancelledError:
        from .steps.parallel import stopping_branch

        if stopping_branch() is not None:  # its parallel group stops it: not the run's interruption
            raise
        if run.interrupted or not run.grace_on_cancel:  # a second Ctrl-C, or no grace: stop at once
            run.interrupted = True
            raise
        run._interrupt()  # the run_on_failure steps still run; the items stop now (run.interrupted)
        interrupted = True
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for event in from_items(run, spec, items, interrupted, started):
        yield event


def from_items(run: Run, spec: StepSpec, items: list[Item], interrupted: bool, started: float) -> list[Event]:
    """The step's own end: its outputs the lists of the items' outputs, bound as the step's."""
    cls = STEP_TYPES[spec.type]
    keep_failed = spec.on_item_failure == "fail"  # the step fails: later run_on_failure steps see what there was
    names = dict.fromkeys(cls.declared_outputs(spec))
    for item in items:
        names.update(dict.fromkeys(item.outputs))
    outputs: dict[str, Any] = {
        name: [item.outputs.get(name) if item.failure is None or keep_failed else None for item in items]
        for name in names}
    failed = [item for item in items if item.failure is not None and item.failure is not run.interruption]
    outputs["errors"] = [{"index": i.index, "error": secrets.redact(i.failure.message)} for i in failed]  # type: ignore[union-attr]
    run._bind(spec, cls, outputs)
    if isinstance(spec.nested, tuple) and items:
        # A looped parallel step: concurrent items' branches bound their own outputs and variables in
        # whatever order they ended; they read as the last item's (the step's outputs have them all).
        last = items[-1].outputs
        for branch in spec.nested:
            run._bind(branch, STEP_TYPES[branch.type], dict(last.get(branch.id) or {}))
    duration = time.monotonic() - started
    failure: FlowError | None = None
    if interrupted:
        failure = run.interruption = FlowRuntimeError(Problem(f"{spec.label} was interrupted", spec.location))
    elif failed and keep_failed:
        failure = failed[0].failure
    if failure is None:
        events: list[Event] = []
        if failed:  # on_item_failure: continue
            message = (f"{len(failed)} of {len(items)} items failed; their results are null "
                       f"(${{steps.{spec.id}.errors}} lists them)")
            log.warning(message)
            events.append(Warning(spec.id, message))
        log.info("step finished", duration=round(duration, 3), items=len(items))
        return [*events, StepFinished(spec.id, "ok", outputs, None, duration, items=len(items))]
    run.errors.append(failure)
    if failure is not run.interruption:
        log.error("step failed", error=secrets.redact(failure.message))
    return [StepFinished(spec.id, "failed", outputs, secrets.redact(str(failure)), duration, items=len(items))]


def _written(value: Any) -> str:
    return value.written if isinstance(value, refs.Template) else "the list"
