"""`history_load`: the newest messages of a conversation, oldest first, ready for a chat step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from ..history import access, properties
from ..llm.replay import records, replays
from .base import Outputs, Step, ref_or

if TYPE_CHECKING:
    from ..flow.model import StepSpec
    from .context import StepContext
    from ..events import Event


class HistoryLoadStep(Step):
    type_name = "history_load"
    summary = "Loads a conversation's last messages (SQL Server, PostgreSQL or SQLite), oldest first."
    connection_types = properties.CONNECTION_TYPES
    connection_default = properties.NO_CONNECTION
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        **properties.PROPERTIES,
        "max_messages": ref_or({"type": "integer", "minimum": 1, "maximum": 10000}) | {
            "default": 20, "description": "at most this many of the newest messages"},
        "max_tokens": ref_or({"type": "integer", "minimum": 1}) | {
            "description": "a token budget (tiktoken cl100k_base): the oldest turns are dropped first, a "
                           "user message and its answer always together"},
    }
    required = ("conversation_id",)
    outputs = {"messages": "[{role, content}] oldest first; [] for a new conversation",
               "count": "how many messages", "dropped": "messages left out to fit max_tokens",
               "tokens": "tokens of the kept messages (null without max_tokens)"}
    result_default = "history"
    result_output = "messages"
    example = """\
- id: recall
  type: history_load
  connection: history        # sqlserver | postgres | sqlite; omit for the embedded SQLite file
  conversation_id: ${inputs.conversation_id}
  max_messages: 20
  max_tokens: 3000
  create: true
"""

    @classmethod
    def connections_used(cls, spec: StepSpec, run: Any) -> list[str]:
        # `serve` passes the client's messages; a replay may serve the recorded history: no store then
        reads = run.client_history is None and not replays(run.llm_mode)
        return super().connections_used(spec, run) if reads else []

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        p = ctx.props
        limit = int(p.get("max_messages", 20))
        mode = ctx.run.llm_mode  # --replay serves what the recorded run loaded, so it repeats that run
        if replays(mode) and (recorded := mode.take_history(ctx.tape_key)) is not None:
            yield Outputs(recorded)
            return
        if ctx.run.client_history is not None:  # `serve`: the messages the client sent (see Run)
            messages = _from_a_turn_start(list(ctx.run.client_history[-limit:]))
        else:
            store, table = await access.open_store(ctx)
            rows = await access.guarded(store.load(table, p["conversation_id"], limit), table, store)
            messages = _from_a_turn_start([{"role": role, "content": content}
                                           for _seq, role, content, _status in reversed(rows)])
        outputs: dict[str, Any] = {"dropped": 0, "tokens": None}
        if p.get("max_tokens") is not None:
            import asyncio

            from ..history.budget import trim

            # In a worker: counting the tokens of long messages must not stall the event loop.
            kept, outputs["tokens"] = await asyncio.to_thread(trim, messages, int(p["max_tokens"]))
            outputs["dropped"] = len(messages) - len(kept)
            messages = kept
        if records(mode):
            mode.save_history(ctx.tape_key, {"conversation_id": p["conversation_id"], "max_messages": limit,
                                            "max_tokens": p.get("max_tokens")}, {"messages": messages, **outputs})
        yield Outputs({"messages": messages, "count": len(messages), **outputs})


def _from_a_turn_start(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history starts at a user message (after any system message). When `max_messages` cuts a
    conversation, the answers before the window's first user message belong to a question left out;
    a history that opens with an assistant message misleads the model, and many chat templates
    reject it outright."""
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages))
    if first_user == 0:
        return messages
    return [m for m in messages[:first_user] if m.get("role") == "system"] + messages[first_user:]
