"""The OpenAI Responses API (`POST /v1/responses`), server side: the request read into the same turn
as a chat completion's, and the Response object and streaming events in the shapes OpenAI sends
(openai-python's types/responses/), so `client.responses.create(stream=True)`, the SDK's
`stream.get_final_response()`, `response.output_text` and the Vercel AI SDK's `openai(...)` work.

`input` (a string, or message items with input_text / output_text parts) and `instructions` (a
system message before them) are what `messages` is to a chat completion.

`previous_response_id`, stateless: a response id carries its conversation's id (base64url, with a
check so a foreign or mistyped id is refused). When the flow keeps history (a `conversation_id`
input and a history_load step), each response belongs to a conversation in the flow's store: the one
the request names (as for chat completions), the one of its previous response, or a new one when
the input is a single turn. Any worker, or any replica on the same store, can continue it; the
store holds one line of turns, so continuing from an older response goes on from the latest turn.
A response that is not in the store (store: false, earlier turns sent in `input`, a flow without
history) has a plain id, and naming it as previous_response_id is a 400 previous_response_not_found.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .openai_api import ROLES, BadRequest, _dumps, _parts, image_ref
from .wire import json_text

PREFIX = "resp_"
_NONCE, _CHECK = 16, 8  # hex digits of a response id's nonce and check
MAX_ID = 4096
_TEXT_PARTS = {"input_text", "output_text", "text"}


@dataclass(frozen=True)
class ResponsesRequest:
    text: str  # the last user message
    earlier: list[dict[str, Any]]  # instructions and the items before it, as {role, content}
    model: str | None
    stream: bool
    conversation_id: str | None
    response_id: str
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)  # extra flow inputs (`inputs` in the body)
    include_usage: bool = False  # the usage is in response.completed
    images: list[Any] = field(default_factory=list)  # the last user item's input_image URLs (or {url, detail})


def response_id(conversation: str | None) -> str:
    """A new response id; with a conversation, one that previous_response_id can continue."""
    nonce = uuid.uuid4().hex[:_NONCE]
    if conversation is None:
        return PREFIX + nonce + uuid.uuid4().hex[:_CHECK + 16]
    packed = base64.urlsafe_b64encode(conversation.encode()).rstrip(b"=").decode()
    return PREFIX + nonce + _check(nonce, conversation) + packed


def conversation_of(response: str) -> str | None:
    """The conversation a response id of ours carries; None for any other id."""
    if not response.startswith(PREFIX) or len(response) > MAX_ID:
        return None
    body = response[len(PREFIX):]
    nonce, check, packed = body[:_NONCE], body[_NONCE:_NONCE + _CHECK], body[_NONCE + _CHECK:]
    try:
        conversation = base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)).decode()
    except ValueError:  # not base64 (binascii.Error), not UTF-8 (UnicodeDecodeError)
        return None
    return conversation if packed and hmac.compare_digest(_check(nonce, conversation), check) else None


def _check(nonce: str, conversation: str) -> str:
    return hashlib.sha256(f"{nonce}:{conversation}".encode()).hexdigest()[:_CHECK]


def _content(content: Any, where: str, images: list[Any] | None) -> str:
    """An item's text. `images`: a list when the flow takes images, which gets the item's input_image
    URLs, as a chat completion's image_url parts (openai_api._text); None refuses them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of input_text parts", f"{where}.content")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        kind = kind if isinstance(kind, str) else type(kind).__name__  # a list here is no set member
        if kind == "input_image" and images is not None:
            if part.get("file_id") is not None and part.get("image_url") is None:
                raise BadRequest("serve keeps no files: send the image as image_url (an https: or data:image/ URL)",
                                 f"{where}.content[{i}].file_id")
            images.append(image_ref(part.get("image_url"), part.get("detail"), f"{where}.content[{i}]", "image_url",
                                    "detail"))
            continue
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            if kind == "input_image":
                raise BadRequest("this flow takes no images (an 'input_image' part): a flow takes them through an "
                                 "array input named `images`", f"{where}.content[{i}]")
            raise BadRequest(f"only text content parts (input_text) are supported, got {kind!r}",
                             f"{where}.content[{i}]")
        parts.append(part["text"])
    return "".join(parts)


def _items(given: Any, images: bool) -> list[dict[str, Any]]:
    """{role, content, images} of each item; `images`: the flow takes them."""
    if isinstance(given, str):
        return [{"role": "user", "content": given, "images": None}]
    if not isinstance(given, list) or not given:
        raise BadRequest("'input' must be a string or a non-empty array of message items ({role, content})", "input")
    items = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise BadRequest(f"only message items are supported, got {kind!r}", where)
        if not isinstance(item.get("role"), str) or item["role"] not in ROLES - {"tool"}:
            raise BadRequest(f"{where} needs a role: one of assistant, developer, system, user", f"{where}.role")
        found: list[Any] | None = [] if images else None
        items.append({"role": item["role"], "content": _content(item.get("content"), where, found), "images": found})
    return items


def parse_responses_request(body: Any, headers: Mapping[str, str], chat: Any) -> ResponsesRequest:
    """`chat`: conversation.ChatInputs, which says whether the flow keeps history."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for key, kind in (("stream", bool), ("store", bool), ("model", str), ("instructions", str),
                      ("previous_response_id", str), ("conversation_id", str), ("inputs", dict), ("metadata", dict)):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise BadRequest(f"'{key}' must be a {'boolean' if kind is bool else 'string' if kind is str else 'object'}",
                             key)
    items = _items(body.get("input"), chat.images is not None)
    last = items[-1]
    if last["role"] != "user" or not (last["content"] or last["images"]):
        raise BadRequest("the last input item must be the user's, with text (role: user)", f"input[{len(items) - 1}]")
    instructions = body.get("instructions") or None
    earlier = [{"role": m["role"], "content": _parts(m) or m["content"]}
               for m in ([{"role": "system", "content": instructions, "images": None}] if instructions else [])
               + items[:-1] if m["content"] or m["images"]]
    metadata = body.get("metadata") or {}
    named = next((c for c in (body.get("conversation_id"), metadata.get("conversation_id"),
                              headers.get("x-conversation-id")) if c is not None), None)
    if named is not None and (not isinstance(named, str) or not named.strip()):
        raise BadRequest("conversation_id must be a non-empty string", "conversation_id")
    previous = body.get("previous_response_id")
    store = body.get("store") is not False
    conversation = named
    if previous is not None:
        conversation = _continued(previous, named, chat)
    elif named is None and store and chat.keeps_history and not any(m["role"] in ("user", "assistant")
                                                                        for m in earlier):
        conversation = "resp-" + uuid.uuid4().hex  # a new conversation in the flow's store
    kept = conversation is not None and chat.keeps_history
    return ResponsesRequest(last["content"], earlier, body.get("model"), bool(body.get("stream")), conversation,
                            response_id(conversation if kept else None), instructions, previous, store, metadata,
                            body.get("inputs") or {}, images=last["images"] or [])


def _continued(previous: str, named: str | None, chat: Any) -> str:
    shown = previous if len(previous) <= 80 else previous[:77] + "..."
    if not chat.keeps_history:
        raise BadRequest(f"Previous response with id '{shown}' not found: flow '{chat.flow.name}' keeps no history "
                         "(it needs a conversation_id input and a history_load step), so its responses cannot be "
                         "continued; send the earlier turns in 'input' instead", "previous_response_id", 400,
                         code="previous_response_not_found")
    conversation = conversation_of(previous)
    if conversation is None:
        raise BadRequest(f"Previous response with id '{shown}' not found: only a response of this flow that "
                         "was stored (not store: false, and not answering earlier turns sent in 'input') can be "
                         "continued", "previous_response_id", 400, code="previous_response_not_found")
    if named is not None and named != conversation:
        raise BadRequest("previous_response_id continues its own conversation: name no other conversation_id with "
                         "it", "previous_response_id")
    return conversation


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {_dumps({'type': kind, **payload})}\n\n".encode()


class ResponsesShapes:
    """The shapes of one response: its Response object, and its events in order, numbered."""

    def __init__(self, model: str, req: ResponsesRequest) -> None:
        self.req, self.model, self.id = req, model, req.response_id
        self.created = int(time.time())
        self.item_id = "msg_" + uuid.uuid4().hex
        self.sequence = 0
        # A text delta is the bulk of the traffic: two fixed pieces around the text and its number.
        self._delta_head = ('event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                            f'"item_id":"{self.item_id}","output_index":0,"content_index":0,"delta":').encode()

    def _next(self, kind: str, payload: dict[str, Any]) -> bytes:
        self.sequence += 1
        return _event(kind, {"sequence_number": self.sequence - 1, **payload})

    def response(self, status: str, output: list[dict[str, Any]], usage: Mapping[str, Any] | None = None,
                 error: dict[str, Any] | None = None, incomplete: str | None = None) -> dict[str, Any]:
        req = self.req
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "completed_at": int(time.time()) if status == "completed" else None,
                "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": req.instructions, "max_output_tokens": None, "max_tool_calls": None,
                "model": self.model, "output": output, "parallel_tool_calls": True,
                "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": req.store, "temperature": None, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "tools": [], "top_p": None, "truncation": "disabled",
                "usage": _usage(usage) if usage is not None else None, "user": None, "metadata": dict(req.metadata)}

    def _message(self, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": parts}

    # --- the stream -------------------------------------------------------------------------------

    def role_chunk(self) -> bytes:
        """The head of the stream: the response created and in progress, its message and text part opened."""
        started = self.response("in_progress", [])
        return (self._next("response.created", {"response": started})
                + self._next("response.in_progress", {"response": started})
                + self._next("response.output_item.added", {"output_index": 0, "item": self._message("in_progress", [])})
                + self._next("response.content_part.added", {"item_id": self.item_id, "output_index": 0,
                                                              "content_index": 0, "part": _text_part("")}))

    def content_chunk(self, text: str) -> bytes:
        self.sequence += 1
        return (self._delta_head + json_text(text)  # per delta: wire.py
                + b',"logprobs":[],"sequence_number":' + str(self.sequence - 1).encode() + b"}\n\n")

    def tail(self, answer: Any, error: Mapping[str, Any] | None, include_usage: bool) -> bytes:
        """The rest of the stream (answer: serve.answer.Answer): each part and the message closed, then
        response.completed (or .incomplete); after a failure, an `error` event and response.failed."""
        at = {"item_id": self.item_id, "output_index": 0}
        if error is not None:
            text = "".join(answer.parts)
            code = error["code"] if error["code"] == "rate_limit_exceeded" else "server_error"
            failed = self.response("failed", [self._message("incomplete", [_text_part(text)])],
                                   error={"code": code, "message": error["message"]})
            return (self._next("error", {"code": code, "message": error["message"], "param": None})
                    + self._next("response.failed", {"response": failed}))
        text, refusal = answer.text, answer.refusal
        parts = [_text_part(text)]
        out = (self._next("response.output_text.done", {**at, "content_index": 0, "text": text, "logprobs": []})
               + self._next("response.content_part.done", {**at, "content_index": 0, "part": parts[0]}))
        if refusal:  # in one piece at the end, as the chat completions stream sends it
            parts.append({"type": "refusal", "refusal": refusal})
            out += (self._next("response.content_part.added", {**at, "content_index": 1,
                                                                "part": {"type": "refusal", "refusal": ""}})
                    + self._next("response.refusal.delta", {**at, "content_index": 1, "delta": refusal})
                    + self._next("response.refusal.done", {**at, "content_index": 1, "refusal": refusal})
                    + self._next("response.content_part.done", {**at, "content_index": 1, "part": parts[1]}))
        status, incomplete = _status(answer.finish_reason)
        message = self._message("completed" if status == "completed" else "incomplete", parts)
        final = self.response(status, [message], answer.usage, incomplete=incomplete)
        return (out + self._next("response.output_item.done", {"output_index": 0, "item": message})
                + self._next(f"response.{status}", {"response": final}))

    # --- a plain (not streamed) answer ----------------------------------------------------------------

    def completion(self, text: str, finish_reason: str, usage: Mapping[str, Any] | None,
                   refusal: str | None = None) -> dict[str, Any]:
        parts = [_text_part(text)] if text or not refusal else []
        if refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        status, incomplete = _status(finish_reason)
        return self.response(status, [self._message("completed" if status == "completed" else "incomplete", parts)],
                             usage or {}, incomplete=incomplete)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    """The response's status, and why it is incomplete: the chat step's finish_reason in Responses terms."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def _usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")  # the model's details, kept
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": int(cached or 0)},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": int(reasoning or 0)},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
