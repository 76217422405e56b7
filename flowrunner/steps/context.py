"""What a running step sees. The engine builds a StepContext for each attempt of a step; steps (and
the helpers they call) depend on this module, never on the engine, so the import graph has no
circle between the engine and the steps it runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..connections.pool import Connections
    from ..errors import FlowError
    from ..flow.model import Flow, StepSpec


class RunView(Protocol):
    """The parts of the engine's Run that steps read."""

    flow: Flow
    run_id: str
    turn_id: str  # history_save's default turn id: the run id, or a batch item's stable id
    connections: Connections
    errors: list[FlowError]
    llm_mode: Any  # None (live), or a flowrunner.llm.replay DryRun / Recorder / Replayer
    client_history: list[dict[str, Any]] | None
    chat_messages: dict[str, list[dict[str, Any]]]  # written by chat steps: each one's messages as last sent
    interrupted: bool  # the run was cancelled: a run_on_failure step runs within the grace time


class StepContext:
    """What a running step sees: its resolved properties and the run's connections."""

    def __init__(self, spec: StepSpec, props: dict[str, Any], run: RunView, attempt: int) -> None:
        self.spec = spec
        self.props = props
        self.run = run
        self.attempt = attempt
        self.partial: Callable[[], dict[str, Any]] | None = None  # set by steps that stream
        # Events a step could not yield because it was stopped from outside (a parallel group's timeout
        # or interruption: its branches' ends): the engine yields them before the step's own end.
        self.after: list[Any] = []
        self.item: int | None = None  # a for_each item's index (the engine sets it)
        # Messages a chat step adds after its prompt's: a structured-output re-ask (llm/structured.py)
        # runs the step again with the rejected answer and the error appended.
        self.followup: list[dict[str, Any]] = []

    @property
    def call_key(self) -> str:
        """What this call's chat_messages are kept under: its step, and its item (concurrent items stay apart)."""
        return self.spec.id if self.item is None else f"{self.spec.id}[{self.item}]"

    @property
    def tape_key(self) -> str:
        """What --record / --replay file a history load under: unique in the run, sub-flows' steps and
        for_each items included (`triage/recall`, `recall[2]`), so each replays its own."""
        return getattr(self.run, "prefix", "") + self.call_key

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
