"""`history_save`: a turn (the user prompt and the response, or a list of messages) into the history,
in one transaction. Every message gets a stable id, so a repeated save updates rather than duplicates.

After a failed step (a chat stream that broke), a save with `run_on_failure: true` still runs: what
there is (the user's message, the partial answer) is stored with status `partial`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import Problem, StepFailed
from ..history import access, properties
from ..llm.replay import calls_model
from .base import Outputs, Step, ref_or

if TYPE_CHECKING:
    from .context import StepContext
    from ..events import Event
    from ..flow.model import StepSpec

ROLES = ("user", "assistant", "system", "tool")
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "additionalProperties": False,
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {"anyOf": [{"type": ["string", "null"]},
                              {"type": "array", "items": {"type": "object", "required": ["type"]}}],
                    "description": "text; of OpenAI content parts only the text is stored (history holds text)"},
        "id": {"type": "string", "minLength": 1, "maxLength": 64, "description": "a stable message id"},
        "metadata": {"type": "object"},
    },
}


class HistorySaveStep(Step):
    type_name = "history_save"
    summary = "Saves a turn to a conversation's history in one transaction; repeating it never duplicates."
    connection_types = properties.CONNECTION_TYPES
    connection_default = properties.NO_CONNECTION
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        **properties.PROPERTIES,
        "user_prompt": {"type": ["string", "null"], "description": "the user's message"},
        "response": {"type": ["string", "null"], "description": "the answer (usually ${response})"},
        "messages": ref_or({"type": "array", "items": _MESSAGE, "minItems": 1}) | {
            "description": "instead of user_prompt/response: [{role, content, id?, metadata?}]"},
        "turn_id": {"type": "string", "minLength": 1, "maxLength": 200,
                    "description": "a stable id for this turn (default: the run id; in a batch with "
                                   "--output FILE, the item's id, the same when --resume runs it again): "
                                   "saving the same turn again, from any run, updates it instead of adding to it"},
        "status": {"enum": ["complete", "partial"],
                   "description": "default: partial when an earlier step failed, else complete"},
        "metadata": ref_or({"type": "object"}) | {"description": "stored with each message (JSON)"},
    }
    required = ("conversation_id",)
    outputs = {"message_ids": "the ids of the saved messages", "count": "how many were saved",
               "status": "complete | partial"}
    example = """\
- id: remember
  type: history_save
  run_on_failure: true       # a broken stream still saves the question and the partial answer
  connection: history
  conversation_id: ${inputs.conversation_id}
  user_prompt: ${inputs.question}
  response: ${response}
"""

    @classmethod
    def connections_used(cls, spec: StepSpec, run: Any) -> list[str]:
        writes = calls_model(run.llm_mode) and run.client_history is None
        return super().connections_used(spec, run) if writes else []

    @classmethod
    def check(cls, spec: StepSpec, flow: Any) -> list[Problem]:
        props = spec.props
        if ("messages" in props) == ("user_prompt" in props):
            return [Problem("give either `user_prompt` (and `response`) or `messages`", spec.location,
                            f"{spec.path_text}")]
        if "messages" in props and "response" in props:
            return [Problem("`response` goes with `user_prompt`; put it in `messages` instead", spec.location,
                            f"{spec.path_text}.response")]
        return []

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        from ..secrets import redact

        p = ctx.props
        failed = bool(ctx.run.errors)
        status = p.get("status") or ("partial" if failed else "complete")
        conversation = p["conversation_id"]
        if "messages" in p:
            items = [m for m in p["messages"] or [] if m.get("content") is not None]
        else:
            items = [{"role": "user", "content": p.get("user_prompt")}]
            if p.get("response") is not None and (p["response"] or not failed):
                items.append({"role": "assistant", "content": p["response"]})
            items = [m for m in items if m["content"] is not None]
        if not items:
            raise StepFailed("nothing to save: the user prompt and the response are both empty")
        base = dict(p.get("metadata") or {})
        if failed and "error" not in base:
            base["error"] = redact(ctx.run.errors[0].message)
        turn = p.get("turn_id") or ctx.run.turn_id  # the run id, or a batch item's stable id
        rows, ids = [], []
        for i, m in enumerate(items):
            mid = m.get("id") or _message_id(conversation, turn, ctx.step_id, i)
            meta = {**base, **(m.get("metadata") or {})}
            rows.append((mid, conversation, m["role"], _text(m["content"]), status, ctx.run.run_id,
                         json.dumps(meta, ensure_ascii=False) if meta else None))
            ids.append(mid)
        if not calls_model(ctx.run.llm_mode):
            # --dry-run / --replay: no model answered, so nothing is written; a replay stays repeatable.
            from ..events import Warning

            yield Warning(ctx.step_id, "not saved: the model was not called (--dry-run or --replay)")
            yield Outputs({"message_ids": ids, "count": 0, "status": status})
            return
        if ctx.run.client_history is not None:  # `serve` with no conversation named: the client keeps it
            yield Outputs({"message_ids": ids, "count": 0, "status": status})
            return
        store, table = await access.open_store(ctx)
        await access.guarded(store.save(table, conversation, rows), table, store)
        yield Outputs({"message_ids": ids, "count": len(rows), "status": status})


def _message_id(conversation: str, turn: str, step: str, index: int) -> str:
    import hashlib  # here, not at the top: loading OpenSSL would slow every `validate`

    key = "\0".join((conversation, turn, step, str(index)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _text(value: Any) -> str:
    from ..refs import to_text

    if isinstance(value, list):  # content parts: the history holds text, so an image is not kept
        from ..history.budget import text_of

        return text_of(value)
    return to_text(value)
