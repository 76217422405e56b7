"""`parallel`: runs its branches (full steps) at the same time, in the run's one variable context.

The branches are checked when the flow is loaded (flow/nested.py): none reads a sibling's outputs or
variables, no variable is bound by two of them, at most one streams text to the sink. Each branch
runs through the engine as any step does (its StepStarted, retries, timeout, StepFinished, its
`result:` bound); the group yields their events as they come. engine.check_connections finds the
branches' connections (flow.model.walk).

When a branch fails, the group stops the branches still running, except those that set
`run_on_failure: true` (they run to their end); each stopped branch ends with status `cancelled`.
The group then fails with the failed branch's error (recorded once). Its outputs are the branches'
outputs by branch id (from each branch's own end, so the items of a looped group stay apart). A
group stopped from outside (its timeout, an interruption) stops its branches at once: each ends
`cancelled` with what it had (the chat step's text so far) bound, and the group's outputs are theirs.

Text reaches the sink only from the one branch that streams (Step.streams): a chat step with
`stream: false` answers in one piece, which would land inside the other's stream, so the group
keeps its text (and a reasoning model's thinking) off the sink; the text is still its output.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Outputs, Step

if TYPE_CHECKING:
    import asyncio

    from ..errors import FlowError
    from ..events import Event
    from ..flow.model import StepSpec
    from .context import StepContext

# Branch tasks the group is stopping because a sibling failed (or the group itself stopped): the
# engine lets their cancellation through (engine.Run._run_step), instead of taking it for an
# interruption of the whole run.
# The value: why, for the branch's `cancelled` end.
_STOPPING: weakref.WeakKeyDictionary[asyncio.Task[Any], str] = weakref.WeakKeyDictionary()


def stopping_branch() -> str | None:
    """Inside a branch that its group is stopping: why (else None)."""
    import asyncio  # lazily, as every import on `validate`'s path (the engine imports this module)

    task = asyncio.current_task()
    return _STOPPING.get(task) if task is not None else None


class BranchFailed(Exception):
    """The group's end when a branch failed: `failure` is that branch's error, already the run's."""

    def __init__(self, failure: FlowError, outputs: dict[str, Any]) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.outputs = outputs


def _branches(spec: StepSpec) -> tuple[StepSpec, ...]:
    return spec.nested if isinstance(spec.nested, tuple) else ()


class ParallelStep(Step):
    type_name = "parallel"
    summary = "Runs its steps (branches) at the same time; the steps after it see all their outputs."
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        "steps": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/step"},
                  "description": "the branches: full steps, run at the same time; ids unique across the flow. "
                                 "None may read another's outputs; at most one may stream text"},
    }
    required = ("steps",)
    outputs: ClassVar[dict[str, str]] = {"BRANCH_ID": "each branch's outputs, by branch id"}
    nests = "steps"
    example = """\
- id: gather
  type: parallel
  steps:
    - {id: retrieve, type: vector_search, connection: docs, table: documents,
       query: "${inputs.question}", embedding: {connection: llm, model: text-embedding-3-small}}
    - {id: recall, type: history_load, connection: history, conversation_id: "${inputs.conversation_id}"}
"""

    @classmethod
    def declared_outputs(cls, spec: StepSpec) -> tuple[str, ...]:
        return tuple(branch.id for branch in _branches(spec))

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        import asyncio

        from ..events import ReasoningDelta, StepFinished, TextDelta

        run: Any = ctx.run
        branches = _branches(self.spec)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        errors_before = len(run.errors)
        finished: set[str] = set()
        failed: str | None = None

        async def pump(branch: StepSpec) -> None:
            quiet = branch.id != getattr(branches, "streaming", None)  # flow.model.Branches, set at load
            try:
                async with aclosing(run.run_step(branch)) as events:
                    async for event in events:
                        if quiet and (type(event) is TextDelta or type(event) is ReasoningDelta):
                            continue  # its words would land inside the streaming branch's
                        queue.put_nowait(event)
            finally:
                queue.put_nowait((_DONE, branch.id))

        tasks = {b.id: asyncio.create_task(pump(b), name=f"flowrunner branch {b.id}") for b in branches}
        outputs: dict[str, dict[str, Any]] = {}  # from each branch's own end: a looped group's items stay apart
        ctx.partial = lambda: {b.id: outputs.get(b.id, {}) for b in branches}  # stopped from outside

        def ended(item: Any, why: str) -> Event | None:
            """A queued item as an event to pass on; a branch's end noted (None: a branch that ended)."""
            if type(item) is tuple and item[0] is _DONE:
                if item[1] in finished:
                    return None
                finished.add(item[1])  # stopped before its end, without one of its own (a for_each branch)
                return StepFinished(item[1], "cancelled", {}, why)
            if type(item) is StepFinished and item.step in tasks and item.item is None:  # not one of its items'
                finished.add(item.step)
                outputs[item.step] = dict(item.outputs)
            return item

        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                running -= type(item) is tuple and item[0] is _DONE
                event = ended(item, f"cancelled: branch '{failed}' failed" if failed else "ended without an end event")
                if event is None:
                    continue
                if type(event) is StepFinished and event.step in tasks and event.item is None \
                        and event.status == "failed" and failed is None:
                    failed = event.step
                    _stop([t for b, t in tasks.items() if b not in finished and not _by_id(branches, b).run_on_failure],
                          f"cancelled: branch '{failed}' failed")
                yield event
        finally:
            left = [t for t in tasks.values() if not t.done()]
            if left:  # the group itself was stopped (a timeout, an interruption): so are its branches
                _stop(left, "cancelled: its parallel step stopped")
                await asyncio.gather(*left, return_exceptions=True)
                while not queue.empty():  # their ends, yielded by the engine before the group's
                    event = ended(queue.get_nowait(), "cancelled: its parallel step stopped")
                    if event is not None:
                        ctx.after.append(event)
        outputs = {b.id: outputs.get(b.id, {}) for b in branches}
        if failed is not None:
            recorded = run.errors[errors_before:]
            if recorded:
                raise BranchFailed(recorded[0], outputs)
        yield Outputs(outputs)


_DONE = object()


def _by_id(branches: tuple[StepSpec, ...], branch_id: str) -> StepSpec:
    return next(b for b in branches if b.id == branch_id)


def _stop(tasks: list[asyncio.Task[Any]], why: str) -> None:
    for task in tasks:
        _STOPPING[task] = why
        task.cancel()
