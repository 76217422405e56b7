"""Runs a flow: steps in order, one shared variable context, timeouts, retries, one event stream.

    run = Run(flow, inputs)
    async for event in run.events(): ...
    run.status, run.outputs, run.error

A failed step does not raise out of `events()`: it ends as StepFinished(status="failed"); later
steps are skipped unless they set run_on_failure, and the run ends failed (exit 1 in the CLI).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any

import structlog

from . import refs, secrets
from .connections.pool import Connections
from .errors import FlowDefinitionError, FlowError, FlowRuntimeError, Problem, StepFailed
from .events import Event, RunFinished, RunStarted, StepFinished, StepRetrying, StepStarted, TextDelta, Warning
from .flow.model import Flow, StepSpec
from .steps import STEP_TYPES
from .steps.base import Outputs, Step

log = structlog.get_logger("flowrunner")


class StepContext:
    """What a running step sees: its resolved properties and the run's connections."""

    def __init__(self, spec: StepSpec, props: dict[str, Any], run: Run, attempt: int) -> None:
        self.spec = spec
        self.props = props
        self.run = run
        self.attempt = attempt
        self.partial: Callable[[], dict[str, Any]] | None = None  # set by steps that stream

    def partial_outputs(self) -> dict[str, Any]:
        """What the step has produced so far, for when it is stopped from outside (a timeout)."""
        return dict(self.partial()) if self.partial else {}

    @property
    def step_id(self) -> str:
        return self.spec.id

    async def connection(self, name: str | None = None) -> Any:
        return await self.run.connections.get(name or self.props["connection"])

    def resolved_connection(self, name: str | None = None) -> Any:
        return self.run.connections.resolved[name or self.props["connection"]]


class Run:
    def __init__(self, flow: Flow, inputs: Mapping[str, Any], *, connections: Connections | None = None,
                 run_id: str | None = None, env: Mapping[str, str] | None = None, llm_mode: Any = None,
                 client_history: list[dict[str, Any]] | None = None) -> None:
        self.flow = flow
        self.inputs = dict(inputs)
        self.run_id = run_id or uuid.uuid4().hex[:12]
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

    @property
    def error(self) -> FlowError | None:
        return self.errors[0] if self.errors else None

    def scope(self) -> refs.Scope:
        return refs.Scope(self.inputs, self.variables, self.step_outputs)

    async def events(self) -> AsyncIterator[Event]:
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(run_id=self.run_id)
        yield RunStarted(self.run_id, self.flow.name, self.inputs)
        log.info("run started", flow=self.flow.name, file=self.flow.file)
        try:
            for spec in self.flow.steps:
                if self.errors and not spec.run_on_failure:
                    yield StepFinished(spec.id, "skipped")
                    continue
                async with aclosing(self._run_step(spec)) as step_events:
                    async for event in step_events:
                        yield event
            if not self.errors:
                self._finish_outputs()
        finally:
            if self._own_connections:
                await self.connections.__aexit__(None, None, None)
        self.status = "failed" if self.errors else "ok"
        duration = time.monotonic() - started
        log.info("run finished", status=self.status, duration=round(duration, 3))
        structlog.contextvars.unbind_contextvars("run_id", "step")
        yield RunFinished(self.run_id, self.status, self.outputs,
                          secrets.redact(str(self.error)) if self.error else None, duration)

    def _finish_outputs(self) -> None:
        if not self.flow.outputs:
            self.outputs = dict(self.variables)
            return
        try:
            self.outputs = refs.resolve(dict(self.flow.outputs), self.scope())
        except refs.RefValueError as e:
            self.errors.append(FlowRuntimeError(Problem(f"flow outputs: {e}", self.flow.source.location(("outputs",)))))

    async def _run_step(self, spec: StepSpec) -> AsyncIterator[Event]:
        cls = STEP_TYPES[spec.type]
        structlog.contextvars.bind_contextvars(step=spec.id)
        started = time.monotonic()
        outputs: dict[str, Any] = {}
        failure: FlowError | None = None
        attempt = 0
        timeout: float | None = None
        try:
            props, timeout = self._resolve(spec)
            while True:
                attempt += 1
                yield StepStarted(spec.id, spec.type, spec.title, attempt)
                log.info("step started", type=spec.type, attempt=attempt)
                sent = False
                outputs = {}
                ctx = StepContext(spec, props, self, attempt)
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
                    if retryable and not sent and attempt < spec.retry.attempts:
                        delay = min(spec.retry.backoff * 2 ** (attempt - 1), spec.retry.max_backoff)
                        message = _message(e, timeout)
                        log.warning("step retrying", error=secrets.redact(message), delay=delay)
                        yield StepRetrying(spec.id, attempt, secrets.redact(message), delay)
                        await asyncio.sleep(delay)
                        continue
                    raise
        except FlowDefinitionError as e:  # e.g. a connection's env var is missing: still the user's setup
            failure = e
        except (StepFailed, TimeoutError) as e:
            failure = self._failure(spec, _message(e, timeout),
                                    e.problems[0].hint if isinstance(e, StepFailed) else None, attempt)
            failure.http_status = e.http_status if isinstance(e, StepFailed) else 504
        except refs.RefValueError as e:
            failure = self._failure(spec, str(e), "the reference resolved to nothing at run time", attempt)
        except FlowRuntimeError as e:
            failure = self._failure(spec, e.message, e.problems[0].hint, attempt)
        except Exception as e:  # a bug, or an error a step failed to wrap: still a clean step failure
            failure = self._failure(spec, f"unexpected error: {type(e).__name__}: {e}",
                                    "run with --debug to see the traceback, and please report it", attempt)
            failure.__cause__ = e
        self._bind(spec, cls, outputs)
        duration = time.monotonic() - started
        if failure is not None:
            self.errors.append(failure)
            log.error("step failed", error=secrets.redact(failure.message), duration=round(duration, 3))
            yield StepFinished(spec.id, "failed", outputs, secrets.redact(str(failure)), duration)
        else:
            log.info("step finished", duration=round(duration, 3))
            yield StepFinished(spec.id, "ok", outputs, None, duration)
        structlog.contextvars.unbind_contextvars("step")

    def _resolve(self, spec: StepSpec) -> tuple[dict[str, Any], float | None]:
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
        timeout = refs.resolve(spec.timeout, scope)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise FlowRuntimeError(Problem(f"timeout must be a positive number of seconds, got {timeout!r}"))
        return props, timeout

    async def _attempt(self, step: Step, ctx: StepContext, timeout: float | None) -> AsyncIterator[Any]:
        """The step's own events. The timeout covers only the step's work: it wraps each `anext`,
        so a cancellation never lands in the consumer's code while the step waits at a `yield`."""
        agen = step.run(ctx)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while True:
                try:
                    if deadline is None:
                        item = await agen.__anext__()
                    else:
                        async with asyncio.timeout_at(deadline):
                            item = await agen.__anext__()
                except StopAsyncIteration:
                    return
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
        return FlowRuntimeError(Problem(f"{spec.label} failed: {secrets.redact(message)}", spec.location, "", hint))


def _message(e: BaseException, timeout: float | None) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g} s" if timeout else "timed out"
    if isinstance(e, FlowError):
        return e.message
    return str(e)
