"""How a chat turn becomes a flow's inputs, for `serve` and `chat`.

The user's message goes to the flow's message input (`question`, `message`, `prompt`, `query`,
`input`, or the one required string input). The earlier turns reach the flow one of two ways:
- a named conversation: its id goes to the flow's `conversation_id` input, and the flow's own
  history steps load and save it (the store holds the conversation);
- otherwise the client's messages are the conversation: they go to an array input named `history`
  (or `messages`) if the flow has one, and history_load steps return them instead of reading their
  store, while history_save steps write nothing (see engine.Run.client_history). A flow with neither
  (flows/chat.yaml) gets them as the history of each chat step that sets no `history:` itself
  (default_chat_history): a client's earlier turns are never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import FlowDefinitionError
from .flow.inputs import resolve_inputs
from .flow.model import Flow

MESSAGE_INPUTS = ("question", "message", "prompt", "user_prompt", "query", "input")
CONVERSATION_INPUT = "conversation_id"
HISTORY_INPUTS = ("history", "messages")
IMAGES_INPUT = "images"  # an array input of this name gets the image URLs of the user's message


@dataclass(frozen=True)
class ChatInputs:
    flow: Flow
    message: str  # the input that takes the user's message
    conversation: str | None  # the input that takes a conversation id
    history: str | None  # an array input that takes the earlier messages
    images: str | None = None  # an array input that takes the user message's image URLs

    @classmethod
    def of(cls, flow: Flow, message_input: str | None = None) -> ChatInputs:
        inputs = flow.inputs
        if message_input is not None:
            if inputs.get(message_input) is None or inputs[message_input].type != "string":
                raise FlowDefinitionError.at(f"--message-input {message_input}: the flow has no string input of that name",
                                             hint=f"its inputs: {', '.join(inputs) or 'none'}")
            name = message_input
        else:
            named = [n for n in MESSAGE_INPUTS if n in inputs and inputs[n].type == "string"]
            required = [n for n, s in inputs.items() if s.type == "string" and not s.has_default]
            if not named and len(required) != 1:
                raise FlowDefinitionError.at(
                    f"flow '{flow.name}' has no input for the user's message",
                    hint="name a string input `question` (or message, prompt, query), or pass --message-input NAME")
            name = named[0] if named else required[0]
        conversation = CONVERSATION_INPUT if getattr(inputs.get(CONVERSATION_INPUT), "type", None) == "string" else None
        history = next((n for n in HISTORY_INPUTS if getattr(inputs.get(n), "type", None) == "array"), None)
        images = IMAGES_INPUT if getattr(inputs.get(IMAGES_INPUT), "type", None) == "array" else None
        return cls(flow, name, conversation, history, images)

    def turn(self, text: str, *, conversation_id: str | None = None, earlier: list[dict[str, Any]] | None = None,
             extra: Mapping[str, Any] | None = None, extra_is_text: bool = False,
             images: list[Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """(the flow's inputs, the client history for Run) for one user message. Raises
        FlowDefinitionError when `extra` inputs are unknown or of the wrong type (`extra_is_text`:
        they are command-line text, to parse as their declared types)."""
        given: dict[str, Any] = dict(extra or {})
        given[self.message] = text
        if self.images and (images or (self.images not in given and self.flow.inputs[self.images].required)):
            given[self.images] = list(images or [])  # a message without images: none, not a missing input
        client_history: list[dict[str, Any]] | None = None
        if conversation_id is not None and self.conversation:
            given[self.conversation] = conversation_id
        if conversation_id is None or not self.keeps_history:
            client_history = list(earlier or [])
            if self.history:
                given[self.history] = client_history
        text = frozenset(extra or ()) if extra_is_text else frozenset()
        return resolve_inputs(self.flow, given, from_text=text), client_history

    @property
    def keeps_history(self) -> bool:
        """True when a conversation id is enough: the flow's history steps keep the conversation."""
        from .flow.model import walk  # branches of parallel steps and sub-flows count too

        return self.conversation is not None and any(s.type == "history_load" for s in walk(self.flow.steps, into_flows=True))


def default_chat_history(run: Any) -> list[dict[str, Any]] | None:
    """The history of a chat step that sets no `history:` (engine.Run `run`): the client's earlier
    messages when the flow has no other way to see them (no history_load step, no history input);
    otherwise None, as in a plain run."""
    if run.client_history is None:
        return None
    flow = run.flow
    if any(getattr(flow.inputs.get(n), "type", None) == "array" for n in HISTORY_INPUTS):
        return None
    from .flow.model import walk  # branches of parallel steps and sub-flows count too

    if any(s.type == "history_load" for s in walk(flow.steps, into_flows=True)):
        return None
    return run.client_history


def outputs_as_answer(outputs: Mapping[str, Any]) -> str:
    """The answer of a flow that streamed no text (no chat step): its one output, or all of them."""
    from .refs import to_text

    if not outputs:
        return ""
    return to_text(next(iter(outputs.values())) if len(outputs) == 1 else dict(outputs))
