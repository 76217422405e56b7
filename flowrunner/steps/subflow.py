"""`flow`: runs another flow file (a sub-flow) as one step.

The sub-flow is loaded and checked with its caller (flow/nested.py): the inputs the step passes are
checked against the ones it declares, a cycle of flows calling each other is an error, and its
connections join the caller's by name (the caller's win), so a run has one pool of connections.

At run time it runs as its own run (its own inputs and variables) on the caller's connections, mode
and run id. Its events pass through nested under the step: each step id becomes `STEP/INNER`
(`triage/classify`), so sinks show them and the stdout sink streams its text; its own run_started and
run_finished are left out (this step's step_started and step_finished stand for them). `result`
binds the sub-flow's outputs (a mapping); a failed sub-flow fails the step with its error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FlowDefinitionError, StepFailed
from .base import Outputs, Step

if TYPE_CHECKING:
    from ..events import Event
    from ..flow.model import Flow, StepSpec
    from .context import StepContext


def _subflow(spec: StepSpec) -> Flow | None:
    return spec.nested if spec.nested is not None and not isinstance(spec.nested, tuple) else None


class FlowStep(Step):
    type_name = "flow"
    summary = "Runs another flow file (a sub-flow) with the given inputs; its outputs are this step's."
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        "flow": {"type": "string", "minLength": 1,
                 "description": "the sub-flow's file, relative to this flow's file (a literal name, no ${...})"},
        "inputs": {"type": "object", "propertyNames": {"$ref": "#/$defs/name"},
                   "description": "the sub-flow's inputs: name -> value (text with ${...}, or any YAML value); "
                                  "checked against the inputs it declares"},
        "result": {"$ref": "#/$defs/name", "description": "variable that receives the sub-flow's outputs (a mapping)"},
    }
    required = ("flow",)
    result_output = "outputs"  # what an optional `result:` gets (no default variable: see bindings)
    outputs: ClassVar[dict[str, str]] = {"outputs": "the sub-flow's outputs (its variables when it declares none)"}
    example = """\
- id: triage
  type: flow
  flow: triage.yaml
  inputs: {ticket: "${inputs.message}"}
  result: triage
"""

    @classmethod
    def output_shape(cls, spec: StepSpec, output: str, flow: Any) -> dict[str, Any] | None:
        """The sub-flow's declared outputs: `${triage.labl}` is a load error when it declares only `label`.
        A sub-flow that declares none gives its variables, known only at run time: not checked."""
        sub = _subflow(spec)
        if output != "outputs" or sub is None or not sub.outputs:
            return None
        return {"type": "object", "properties": {name: {} for name in sub.outputs}, "additionalProperties": False}

    @classmethod
    def bindings(cls, spec: StepSpec) -> dict[str, str]:
        name = spec.props.get("result")
        return {name: "outputs"} if isinstance(name, str) else {}

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        import structlog

        from ..events import RunFinished, RunStarted, StepFinished, TextDelta
        from ..flow.inputs import resolve_inputs

        sub = _subflow(self.spec)
        if sub is None:  # the loader attaches it to every flow step of a flow that loaded
            raise StepFailed("the sub-flow was not loaded")
        try:
            inputs = resolve_inputs(sub, dict(ctx.props.get("inputs") or {}))
        except FlowDefinitionError as e:  # a ${...} value of the wrong type: known only now
            p = e.problems[0]
            raise StepFailed(f"the sub-flow {sub.file}: {p.message}", hint=p.hint) from None
        run: Any = ctx.run
        child = run.sub_run(sub, inputs)
        child.prefix = f"{run.prefix}{ctx.call_key}/"  # its steps' keys in --record tapes: unique in the run
        prefix = f"{ctx.step_id}/"
        try:
            async with aclosing(child.events()) as events:
                async for event in events:
                    kind = type(event)
                    if kind is TextDelta:  # the hot path: a streamed answer's every word
                        yield TextDelta(prefix + event.step, event.text)
                        continue
                    if kind is RunStarted or kind is RunFinished:
                        continue
                    inner = getattr(event, "step", None)
                    key = inner if kind is not StepFinished or event.item is None else f"{inner}[{event.item}]"
                    if kind is StepFinished and key in child.chat_messages:  # `serve` counts tokens by step id
                        run.chat_messages[prefix + key] = child.chat_messages[key]
                    yield dataclasses.replace(event, step=prefix + inner if inner else ctx.step_id)  # type: ignore[call-arg]
        finally:
            # The sub-flow's run bound and unbound the log context; give the caller's back.
            structlog.contextvars.bind_contextvars(run_id=run.run_id, step=ctx.step_id)
        outputs = {"outputs": dict(child.outputs)}
        if child.status != "ok":
            error = child.error
            if error is None:
                raise StepFailed(f"the sub-flow {sub.file} ended {child.status}", outputs=outputs)
            p = error.problems[0]
            raise StepFailed(f"{p.location}: {p.message}" if p.location else p.message, hint=p.hint, outputs=outputs,
                             http_status=getattr(error, "http_status", 500))
        yield Outputs(outputs)
