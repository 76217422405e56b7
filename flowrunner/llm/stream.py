"""The fast path: read a chat completion stream straight from the HTTP response.

The openai SDK builds a pydantic object per chunk (~160-200 µs of CPU each); here each event is
decoded by httpx2's SSE parser and json.loads into plain dicts, and every content delta is yielded
the moment it arrives. Everything that can go wrong in a stream — a cut connection, a stall, a
malformed chunk, an error event, a 200 that is not an event stream, no finish_reason — is raised
as a StreamError, never passed on as a silently short answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..events import TextDelta
from ..secrets import shorten  # masks, then cuts: a cut secret would no longer be masked


DRAIN_SECONDS = 0.1


class StreamError(Exception):
    def __init__(self, message: str, hint: str | None = None, *, retryable: bool = False, status: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retryable = retryable
        self.status = status  # for `serve`'s clients: the model server misbehaved (502), timed out (504)...
        self.headers: dict[str, str] | None = None  # for `serve`'s clients: the server's Retry-After


@dataclass
class StreamState:
    """What the stream has delivered so far: complete on success, partial when it broke."""

    parts: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    done: bool = False  # saw `data: [DONE]`

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add_tool_calls(self, fragments: list[dict[str, Any]]) -> None:
        """The first fragment of a call carries id, type and name; later ones only pieces of
        `arguments`, to be joined per index."""
        for frag in fragments:
            call = self.tool_calls.setdefault(frag.get("index", 0), {"id": None, "type": "function", "name": "",
                                                                      "arguments": ""})
            if frag.get("id"):
                call["id"] = frag["id"]
            if frag.get("type"):
                call["type"] = frag["type"]
            function = frag.get("function") or {}
            if function.get("name"):
                call["name"] += str(function["name"])
            if function.get("arguments"):
                call["arguments"] += str(function["arguments"])

    def parsed_tool_calls(self) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self.tool_calls):
            call = dict(self.tool_calls[index])
            raw = call["arguments"] or "{}"
            try:
                call["arguments"] = json.loads(raw)
            except json.JSONDecodeError as e:
                raise StreamError(f"tool call '{call['name']}' has malformed JSON arguments ({e.msg}): {shorten(raw, 120)!r}") from None
            out.append(call)
        return out

    def outputs(self, *, partial: bool, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """`tool_calls`: already parsed ones, so a finished stream parses its arguments once."""
        calls = tool_calls
        if calls is None:
            try:
                calls = self.parsed_tool_calls()
            except StreamError:
                calls = [dict(c) for _, c in sorted(self.tool_calls.items())]  # keep a broken call's raw text
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "tool_calls": calls,
            "refusal": "".join(self.refusal) or None,
            "model": self.model,
            "partial": partial,
        }


async def read_stream(response: Any, step_id: str, state: StreamState, idle_timeout: float,
                      tap: list[str] | None = None) -> AsyncIterator[TextDelta]:
    """Yield a TextDelta per content piece of the first choice, filling `state` as it goes.
    `tap` (for --record) receives every data payload as it arrived."""
    import httpx2

    try:
        # After [DONE], read the (empty) rest of the body for up to DRAIN_SECONDS, so the connection
        # goes back to the pool instead of being dropped: the next request skips a TCP handshake.
        async with asyncio.timeout(None) as drain:
            async for sse in httpx2.EventSource(response):
                if state.done:
                    continue
                data = sse.data
                if not data:
                    continue
                if tap is not None:
                    tap.append(data)
                if data.startswith("[DONE]"):
                    state.done = True
                    drain.reschedule(asyncio.get_running_loop().time() + DRAIN_SECONDS)
                    continue
                text = _data(data, state)
                if text:
                    yield TextDelta(step_id, text)
    except TimeoutError:
        if not state.done:
            raise
    except httpx2.SSEError as e:
        if "content type" in str(e):
            body = shorten((await response.aread()).decode("utf-8", "replace"), 200)  # masked, then cut
            ctype = response.headers.get("content-type", "none")
            raise StreamError(f"the server replied {response.status_code} with content type {ctype!r}, "
                              f"not an event stream: {body!r}",
                              "is base_url an OpenAI-compatible server that supports stream: true?") from None
        raise StreamError(f"the event stream is broken: {e}") from None
    except httpx2.ReadTimeout:
        raise StreamError(f"the stream stalled: no data for {idle_timeout:g} s",
                          "the connection's `timeout` sets the longest silence allowed", retryable=True,
                          status=504) from None
    except httpx2.TransportError as e:
        if state.finish_reason:
            return  # the answer and its finish_reason arrived: a cut before [DONE] is only a warning
        raise StreamError(f"the connection broke mid-stream ({type(e).__name__}: {e or 'closed'})",
                          retryable=True) from None


async def replay_stream(chunks: list[str], step_id: str, state: StreamState) -> AsyncIterator[TextDelta]:
    """A recorded stream's data payloads, through the same parsing, with the same chunking."""
    for data in chunks:
        if state.done:
            break
        if data.startswith("[DONE]"):
            state.done = True
            continue
        text = _data(data, state)
        if text:
            yield TextDelta(step_id, text)


def _data(data: str, state: StreamState) -> str | None:
    """One event's data: parsed, checked, folded into `state`; its content delta, if any."""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise StreamError(f"the server sent a malformed chunk: {shorten(data, 120)!r}",
                          "the server does not speak the OpenAI streaming format correctly") from None
    if type(chunk) is not dict:
        raise StreamError(f"the server sent a chunk that is not a JSON object: {shorten(data, 120)!r}")
    try:
        return _apply(chunk, state)
    except (AttributeError, TypeError, KeyError, ValueError):
        raise StreamError(f"the server sent a chunk of an unexpected shape: {shorten(data, 160)!r}",
                          "the server does not speak the OpenAI streaming format correctly") from None


def _apply(chunk: dict[str, Any], state: StreamState) -> str | None:
    """Fold one chunk into `state`; return its content delta (first choice only), if any."""
    if chunk.get("error"):
        raise StreamError(f"the server reported an error mid-stream: {_error_text(chunk['error'])}", retryable=True)
    if state.model is None and chunk.get("model"):
        state.model = chunk["model"]
    usage = chunk.get("usage")
    if usage:
        state.usage = dict(usage)
    text = None
    for choice in chunk.get("choices") or ():  # Azure sends chunks with no choices: fine
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if delta:
            content = delta.get("content")
            if content:
                if type(content) is not str:
                    raise TypeError("content is not text")
                state.parts.append(content)
                text = content
            if delta.get("tool_calls"):
                state.add_tool_calls(delta["tool_calls"])
            if delta.get("refusal"):
                state.refusal.append(str(delta["refusal"]))
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
    return text


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)
    return str(error)
