"""Runs a flow: steps in order, one shared variable context, timeouts, retries, one event stream.

    run = Run(flow, inputs)
    async for event in run.events(): ...
    run.status, run.outputs, run.error

A failed step does not raise out of `events()`: it ends as StepFinished(status="failed"); later
steps are skipped unless they set run_on_failure, and the run ends failed (exit 1 in the CLI).

Cancelled (the task running the run), the run is "interrupted". What happens next is the caller's
choice, `grace_on_cancel`. On (`run` and `batch` on Ctrl-C / SIGTERM, `chat` on Ctrl-C: a person
stopped it), the step that was running ends failed with what it had produced (the chat step's text so
far), the steps that set run_on_failure still run, within STOP_GRACE seconds in all, so that the turn
the user saw is saved; a second cancellation stops at once. Off (`serve`: its client left, or the
server is shutting down; `batch --fail-fast` stopping the other items), the run stops at once. Either
way RunFinished (status "interrupted", the outputs so far) is yielded, and the cancellation goes on
(CancelledError), also to a consumer that stops iterating at RunFinished (it is raised when the
generator is closed).

Callers check the connections' environment once, with check_connections, before the first run.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import structlog

from . import foreach, refs, secrets
from .connections.pool import Connections
from .errors import FlowDefinitionError, FlowError, FlowRuntimeError, Problem, StepFailed
from .events import Event, RunFinished, RunStarted, StepFinished, StepRetrying, StepStarted, TextDelta, Warning
from .flow.model import Flow, StepSpec, walk
from .steps import STEP_TYPES
from .steps.base import Outputs, Step
from .steps.context import StepContext
from .steps.parallel import BranchFailed, stopping_branch

log = structlog.get_logger("flowrunner")

STOP_GRACE = 5.0  # seconds that run_on_failure steps get, all together, after an interruption


class _Setup:
    """What Step.connections_used reads of a run (a RunView's llm_mode and client_history), before any run."""

    def __init__(self, llm_mode: Any, client_history: list[dict[str, Any]] | None) -> None:
        self.llm_mode = llm_mode
        self.client_history = client_history


def check_connections(flow: Flow, connections: Connections, *, llm_mode: Any = None,
                      client_history: list[dict[str, Any]] | None = None) -> list[str]:
    """The connections the flow's steps open in this mode (a replay opens no model; `serve` and `chat`
    with the client's history open no history store), checked for every unset ${env.X} at once, in
    one error (FlowDefinitionError). Called once, before the first run (of `run`, of a `chat`
    session, of a batch, of a server), so a run never stops over one after it has done some work; a
    name from a ${...} reference is checked when used. Returns their names: batch and serve open them
    before the first item or request."""
    setup = _Setup(llm_mode, client_history)
    used = list(dict.fromkeys(name for spec in walk(flow.steps, into_flows=True)
                              for name in STEP_TYPES[spec.type].connections_used(spec, setup)))
    connections.check_env(used)
    return used


class Run:
    def __init__(self, flow: Flow, inputs: Mapping[str, Any], *, connections: Connections | None = None,
                 run_id: str | None = None, env: Mapping[str, str] | None = None, llm_mode: Any = None,
                 client_history: list[dict[str, Any]] | None = None, turn_id: str | None = None,
                 grace_on_cancel: bool = True) -> None:
        self.flow = flow
        self.inputs = dict(inputs)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        # What history_save steps save this run's turn under (unless a step sets turn_id): a run that
        # repeats an earlier one (a batch item run again by --resume) passes the same id, so the turn
        # it saves again replaces the earlier one instead of being added twice.
        self.turn_id = turn_id or self.run_id
        self.interrupted = False
        self.interruption: FlowError | None = None  # the error of the step that was interrupted
        # Cancelled, do the run_on_failure steps still run (within stop_grace)? Read when the
        # cancellation comes, so a caller may change it on the way (batch --fail-fast turns it off).
        self.grace_on_cancel = grace_on_cancel
        self.stop_grace = STOP_GRACE
        self._grace_until: float | None = None  # the loop time at which run_on_failure steps are stopped
        self._own_connections = connections is None
        self.connections = connections or Connections(flow, os.environ if env is None else env)
        self.variables: dict[str, Any] = {}
        self.step_outputs: dict[str, dict[str, Any]] = {}
        self.status = "pending"
        self.outputs: dict[str, Any] = {}
        self.errors: list[FlowError] = []
        self.llm_mode = llm_mode  # None (live), or a flowrunner.llm.replay DryRun / Recorder / Replayer
        # `serve`: the conversation a client sent with its request. history_load steps return it instead
        # of reading their store, and history_save steps write nothing: the client keeps the conversation.
        self.client_history = client_history
        # Each chat step's messages as last sent, by step id: `serve` counts their tokens itself when
        # the model's server reports no usage (llama.cpp, Ollama, most mocks).
        self.chat_messages: dict[str, list[dict[str, Any]]] = {}
        self.prefix = ""  # a sub-flow's run: the calling step's "ID/" (StepContext.tape_key)
        self.skipped: set[str] = set()  # refs.Scope.skipped: what skipped steps left null (foreach.skip)
        # Outputs that may read null although their step succeeded (refs.Scope.optional): built once,
        # since scope() is called for every step.
        self._optional = {spec.id: STEP_TYPES[spec.type].optional_outputs for spec in walk(flow.steps)}

    @property
    def error(self) -> FlowError | None:
        return self.errors[0] if self.errors else None

    def run_step(self, spec: StepSpec) -> AsyncIterator[Event]:
        """One step as the engine runs it (its events, retries, binding, StepFinished): a parallel
        group runs each of its branches through here, in a task of its own."""
        return self._run_step(spec)

    def sub_run(self, flow: Flow, inputs: Mapping[str, Any]) -> Run:
        """A `flow` step's sub-flow: its own inputs and variables, this run's connections (one pool),
        mode, run id and turn id."""
        return Run(flow, inputs, connections=self.connections, run_id=self.run_id, llm_mode=self.llm_mode,
                   client_history=self.client_history, turn_id=self.turn_id, grace_on_cancel=self.grace_on_cancel)

    def scope(self) -> refs.Scope:
        item = foreach.variables(self)  # inside a for_each item: ${item}, ${item_index}
        return refs.Scope(self.inputs, {**self.variables, **item} if item else self.variables, self.step_outputs,
                          optional=self._optional, skipped=self.skipped)

    def _absent_warnings(self, scope: refs.Scope, where: str, step: str | None = None) -> list[Warning]:
        """One warning per reference that read null inside an optional output (refs.Scope.optional)."""
        warnings = [Warning(step, f"{where}: {message}") for message in dict.fromkeys(scope.absent)]
        for warning in warnings:
            log.warning(secrets.redact(warning.message))
        return warnings

    async def events(self) -> AsyncIterator[Event]:
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(run_id=self.run_id)
        yield RunStarted(self.run_id, self.flow.name, self.inputs)
        log.info("run started", flow=self.flow.name, file=self.flow.file)
        try:
            try:
                for spec in self.flow.steps:
                    if self.errors and not spec.run_on_failure:
                        yield StepFinished(spec.id, "skipped", reason="an earlier step failed")
                        continue
                    async with aclosing(self._run_step(spec)) as step_events:
                        async for event in step_events:
                            yield event
            except asyncio.CancelledError:  # interrupted again, without grace, or outside a step: no more steps
                self.interrupted = True
            if self.interrupted:
                self.outputs, _ = self._resolve_outputs(missing_is_null=True)
            elif not self.errors:
                try:
                    self.outputs, warnings = self._resolve_outputs(missing_is_null=False)
                except refs.RefValueError as e:
                    self.errors.append(FlowRuntimeError(Problem(f"flow outputs: {e}",
                                                                self.flow.source.location(("outputs",)))))
                    warnings = []
                for warning in warnings:
                    yield warning
        finally:
            if self._own_connections:
                await self.connections.__aexit__(None, None, None)
        self.status = "interrupted" if self.interrupted else "failed" if self.errors else "ok"
        duration = time.monotonic() - started
        log.info("run finished", status=self.status, duration=round(duration, 3))
        structlog.contextvars.unbind_contextvars("run_id", "step")
        try:
            yield RunFinished(self.run_id, self.status, self.outputs,
                              secrets.redact(str(self.error)) if self.error else None, duration)
        finally:
            # The run's own clean-up is done: the cancellation goes on to its caller, also when the
            # caller stopped at RunFinished (closing the generator raises it).
            if self.interrupted:
                raise asyncio.CancelledError  # noqa: B012 - on purpose: it replaces GeneratorExit

    def _resolve_outputs(self, *, missing_is_null: bool) -> tuple[dict[str, Any], list[Warning]]:
        """The flow's outputs (its variables when it declares none), and a warning for each reference
        that read null inside an optional output. missing_is_null (an interrupted run's outputs so
        far): what no step produced reads null, and an output that still cannot be resolved is null;
        else such a reference raises RefValueError."""
        if not self.flow.outputs:
            return dict(self.variables), []
        scope = self.scope()
        scope.missing_is_null = missing_is_null
        outputs: dict[str, Any] = {}
        for name, value in self.flow.outputs.items():
            try:
                outputs[name] = refs.resolve(value, scope)
            except refs.RefValueError:
                if not missing_is_null:
                    raise
                outputs[name] = None
        return outputs, self._absent_warnings(scope, "flow outputs") if not missing_is_null else []

    def _interrupt(self) -> None:
        """The first interruption: take back the cancellation for the run_on_failure steps' grace time
        (CancelledError is raised again when the run is over), and start that time."""
        self.interrupted = True
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        self._grace_until = asyncio.get_running_loop().time() + self.stop_grace
        if any(spec.run_on_failure for spec in self.flow.steps):
            log.info("interrupted: the run_on_failure steps still run", within=self.stop_grace)

    async def _run_step(self, spec: StepSpec, *, plain: bool = False) -> AsyncIterator[Event]:
        """plain: run it as written, `when` and `for_each` already dealt with (foreach.py calls back
        here for the step itself, or for each of its items)."""
        if not plain and (spec.when is not None or spec.for_each is not None):
            async with aclosing(foreach.controlled(self, spec)) as controlled:
                async for event in controlled:
                    yield event
            return
        looped = foreach.current(self, spec)  # one item of a for_each step: it gathers the item's outputs
        index = looped.index if looped is not None else None
        cls = STEP_TYPES[spec.type]
        structlog.contextvars.bind_contextvars(step=spec.id)
        started = time.monotonic()
        outputs: dict[str, Any] = {}
        failure: FlowError | None = None
        attempt = 0
        timeout: float | None = None
        ctx: StepContext | None = None
        followup: list[dict[str, Any]] = []  # a re-ask's messages (StepFailed.reask), for the next attempt
        try:
            props, timeout, warnings = self._resolve(spec)
            for warning in warnings:
                yield warning
            while True:
                attempt += 1
                yield StepStarted(spec.id, spec.type, spec.title, attempt, index)
                log.info("step started", type=spec.type, attempt=attempt)
                sent = False
                outputs = {}
                ctx = StepContext(spec, props, self, attempt)
                ctx.item = index
                ctx.followup = followup
                try:
                    async with aclosing(self._attempt(cls(spec), ctx, timeout)) as items:
                        async for item in items:
                            if isinstance(item, Outputs):
                                outputs = dict(item.values)
                            else:
                                sent = sent or type(item) is TextDelta
                                if type(item) is Warning:
                                    log.warning(secrets.redact(item.message))
                                yield item
                    break
                except (StepFailed, TimeoutError) as e:
                    retryable = isinstance(e, TimeoutError) or e.retryable
                    # What the step had produced: its error's outputs, or on a timeout what it
                    # published as it went (the chat step's text so far).
                    outputs = dict(e.outputs) if isinstance(e, StepFailed) else ctx.partial_outputs()
                    while ctx.after:
                        yield ctx.after.pop(0)
                    # A re-ask (a structured answer that does not fit) is announced by the step: it may follow text.
                    reask = e.reask if isinstance(e, StepFailed) else None
                    if retryable and (not sent or reask is not None) and attempt < spec.retry.attempts \
                            and not self.interrupted:
                        followup = reask if reask is not None else followup
                        delay = 0.0 if reask is not None else \
                            min(spec.retry.backoff * 2 ** (attempt - 1), spec.retry.max_backoff)
                        message = _message(e, timeout)
                        log.warning("step retrying", error=secrets.redact(message), delay=delay)
                        yield StepRetrying(spec.id, attempt, secrets.redact(message), delay, index)
                        await asyncio.sleep(delay)
                        continue
                    raise
        except asyncio.CancelledError:
            # Stopped by the step around it, not by the run: a for_each item keeps what it had (its text so
            # far); a parallel branch (a sibling failed, the group stopped) ends `cancelled` with it, bound.
            if looped is not None:
                looped.outputs = ctx.partial_outputs() if ctx is not None else {}
                raise
            why = stopping_branch()
            if why is not None:
                outputs = ctx.partial_outputs() if ctx is not None else {}
                self._bind(spec, cls, outputs)
                yield StepFinished(spec.id, "cancelled", outputs, why, time.monotonic() - started)
                structlog.contextvars.unbind_contextvars("step")
                return
            if self.interrupted or not self.grace_on_cancel:  # the second Ctrl-C (or SIGTERM), or no grace: stop at once
                self.interrupted = True
                raise
            self._interrupt()
            if ctx is not None and ctx.partial is not None:  # e.g. the chat step's text so far
                outputs = ctx.partial_outputs()
            failure = self.interruption = FlowRuntimeError(Problem(f"{spec.label} was interrupted", spec.location))
            while ctx is not None and ctx.after:
                yield ctx.after.pop(0)
        except BranchFailed as e:  # a parallel group: its failed branch's error, already recorded
            failure, outputs = e.failure, e.outputs
        except FlowDefinitionError as e:  # e.g. a connection's env var is missing: still the user's setup
            failure = e
            if self.step_outputs:  # ...but once a step has run, the run failed (exit 1, not 2): every problem
                failure = FlowRuntimeError([self._failure(spec, p.message, p.hint, attempt).problems[0]
                                            for p in e.problems])
        except (StepFailed, TimeoutError) as e:
            failure = self._failure(spec, _message(e, timeout),
                                    e.problems[0].hint if isinstance(e, StepFailed) else None, attempt)
            failure.http_status = e.http_status if isinstance(e, StepFailed) else 504
            failure.http_headers = e.http_headers if isinstance(e, StepFailed) else None
        except refs.RefValueError as e:
            failure = self._failure(spec, str(e), "the reference resolved to nothing at run time", attempt)
        except FlowRuntimeError as e:
            failure = self._failure(spec, e.message, e.problems[0].hint, attempt)
        except Exception as e:  # a bug, or an error a step failed to wrap: still a clean step failure
            failure = self._failure(spec, f"unexpected error: {type(e).__name__}: {e}",
                                    "run with --debug to see the traceback, and please report it", attempt)
            failure.__cause__ = e
        if looped is not None:
            looped.outputs, looped.failure = outputs, failure
        else:
            self._bind(spec, cls, outputs)
        duration = time.monotonic() - started
        if failure is not None:
            if looped is None and not any(failure is known for known in self.errors):  # a group's is its branch's
                self.errors.append(failure)
            if failure is self.interruption:  # the person stopped it: not an error of the flow's
                log.warning("step interrupted", duration=round(duration, 3))
            else:
                log.error("step failed", error=secrets.redact(failure.message), duration=round(duration, 3))
            yield StepFinished(spec.id, "failed", outputs, secrets.redact(str(failure)), duration, item=index)
        else:
            log.info("step finished", duration=round(duration, 3))
            yield StepFinished(spec.id, "ok", outputs, None, duration, item=index)
        structlog.contextvars.unbind_contextvars("step")

    def _resolve(self, spec: StepSpec) -> tuple[dict[str, Any], float | None, list[Warning]]:
        """The step's properties with references replaced; values that came through a reference are
        checked against the step's schema now, as literal values were when the flow was loaded."""
        from .flow.schema import runtime_problems

        scope = self.scope()
        scope.missing_is_null = bool(self.errors)  # only run_on_failure steps run after a failure
        props = refs.resolve(dict(spec.props), scope)
        templated = [k for k, v in spec.props.items() if isinstance(v, refs.Template)]
        if templated:
            problems = runtime_problems(spec.type, props, templated)
            if problems:
                raise FlowRuntimeError(Problem(problems[0], hint="a ${...} reference resolved to a value "
                                                                 "this property does not take"))
            allowed = STEP_TYPES[spec.type].connection_types
            if "connection" in templated and allowed:  # a name from a reference: declared, and of the right type?
                self.connections.check(props["connection"], allowed, f"a {spec.type} step",
                                       f"connection {spec.props['connection'].written} is {props['connection']!r}")
        timeout = refs.resolve(spec.timeout, scope)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise FlowRuntimeError(Problem(f"timeout must be a positive number of seconds, got {timeout!r}"))
        return props, timeout, self._absent_warnings(scope, spec.label, spec.id)

    async def _attempt(self, step: Step, ctx: StepContext, timeout: float | None) -> AsyncIterator[Any]:
        """The step's own events. The timeout covers only the step's work: it wraps each `anext`,
        so a cancellation never lands in the consumer's code while the step waits at a `yield`; and
        opening a connection pauses it (stepclock.py). After an interruption, the grace time bounds
        the step too, connection opening included."""
        from .stepclock import StepClock

        agen = step.run(ctx)
        loop = asyncio.get_running_loop()
        clock = StepClock(None if timeout is None else loop.time() + timeout)
        grace = self._grace_until
        stop: asyncio.Timeout | None = None
        try:
            while True:
                try:
                    if clock.deadline is None and grace is None:  # the common case: nothing to time
                        item = await agen.__anext__()
                    else:
                        async with asyncio.timeout_at(grace) as stop, clock.timing():
                            item = await agen.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if stop is not None and stop.expired():
                        raise StepFailed(f"stopped: the run was interrupted, and the {self.stop_grace:g} s that "
                                         "run_on_failure steps get after an interruption ran out",
                                         outputs=ctx.partial_outputs()) from None
                    raise
                yield item
        finally:
            await agen.aclose()

    def _bind(self, spec: StepSpec, cls: type[Step], outputs: dict[str, Any]) -> None:
        self.step_outputs[spec.id] = outputs
        for var, output in cls.bindings(spec).items():
            if output in outputs:
                self.variables[var] = outputs[output]

    def _failure(self, spec: StepSpec, message: str, hint: str | None, attempts: int) -> FlowRuntimeError:
        if attempts > 1:
            message += f" (after {attempts} attempts)"
        item = foreach.current(self, spec)
        label = spec.label if item is None else f"{spec.label} item {item.index}"
        return FlowRuntimeError(Problem(f"{label} failed: {secrets.redact(message)}", spec.location, "", hint))


def _message(e: BaseException, timeout: float | None) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(e, FlowError):
        return e.message
    return str(e)
