"""The fast path: read a chat completion stream straight from the HTTP response.

The openai SDK builds a pydantic object per chunk (~160-200 µs of CPU each); here each event is
split out by sse.py and decoded by json.loads into plain dicts, and every content delta is yielded
the moment it arrives. Everything that can go wrong in a stream — a cut connection, a stall, a
malformed chunk, an error event, a 200 that is not an event stream, no finish_reason — is raised
as a StreamError, never passed on as a silently short answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..events import ReasoningDelta, TextDelta
from ..secrets import shorten  # masks, then cuts: a cut secret would no longer be masked
from .sse import sse_data


DRAIN_SECONDS = 0.1


class StreamError(Exception):
    def __init__(self, message: str, hint: str | None = None, *, retryable: bool = False, status: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.retryable = retryable
        self.status = status  # for `serve`'s clients: the model server misbehaved (502), timed out (504)...
        self.headers: dict[str, str] | None = None  # for `serve`'s clients: the server's Retry-After
        self.server_status: int | None = None  # the model server's own HTTP status, when it refused the request


@dataclass
class StreamState:
    """What the stream has delivered so far: complete on success, partial when it broke."""

    parts: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    thought: str | None = None  # the reasoning piece of the chunk just read, for the reader to yield
    after_thought: str | None = None  # the content that came in the same delta, to yield after it
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    done: bool = False  # saw `data: [DONE]`
    logprobs: list[dict[str, Any]] | None = None  # a list only when the step asked for logprobs
    connection: str | None = None  # the connection that answered: the step's own, or a fallback's
    place: int = 0  # the model that answered: 0 the step's own, n its n-th fallback (a re-ask goes there)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take_thought(self, step_id: str) -> list[ReasoningDelta | TextDelta]:
        """The events of a chunk that carried reasoning: its piece, then any content beside it."""
        events: list[ReasoningDelta | TextDelta] = [ReasoningDelta(step_id, self.thought or "")]
        if self.after_thought:
            events.append(TextDelta(step_id, self.after_thought))
        self.thought = self.after_thought = None
        return events

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
            "reasoning": "".join(self.reasoning) or None,
            "model": self.model,
            "logprobs": self.logprobs,
            "connection": self.connection,
            "partial": partial,
        }


async def read_stream(response: Any, step_id: str, state: StreamState, idle_timeout: float,
                      tap: list[str] | None = None) -> AsyncIterator[TextDelta | ReasoningDelta]:
    """Yield a TextDelta per content piece of the first choice (a ReasoningDelta per reasoning piece),
    filling `state` as it goes. `tap` (for --record) receives every data payload as it arrived."""
    import httpx2

    try:
        # After [DONE], read the (empty) rest of the body for up to DRAIN_SECONDS, so the connection
        # goes back to the pool instead of being dropped: the next request skips a TCP handshake.
        async with asyncio.timeout(None) as drain:
            async for data in sse_data(response):  # sse.py: httpx2's EventSource, with less work per event
                if state.done or not data:
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
                elif state.thought is not None:
                    for event in state.take_thought(step_id):
                        yield event
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


async def replay_stream(chunks: list[str], step_id: str,
                        state: StreamState) -> AsyncIterator[TextDelta | ReasoningDelta]:
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
        elif state.thought is not None:
            for event in state.take_thought(step_id):
                yield event


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
                # A plain content delta ({"content": ...}) pays nothing for reasoning. vLLM's delta where
                # the thinking ends may carry both: the reader yields the reasoning first, then the text.
                if len(delta) > 1 and _reasoning(delta, state):
                    state.after_thought, text = content, None
            else:
                _reasoning(delta, state)
            if delta.get("tool_calls"):
                state.add_tool_calls(delta["tool_calls"])
            if delta.get("refusal"):
                state.refusal.append(str(delta["refusal"]))
        if state.logprobs is not None:
            _keep_logprobs(choice, state.logprobs)
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
    return text


def _keep_logprobs(choice: dict[str, Any], kept: list[dict[str, Any]]) -> None:
    """`choices[0].logprobs.content`: one entry per token, each chunk adding those of its delta."""
    logprobs = choice.get("logprobs")
    if logprobs:
        content = logprobs.get("content")
        if content:
            if type(content) is not list:
                raise TypeError("logprobs.content is not a list")
            kept.extend(content)


def _reasoning(delta: dict[str, Any], state: StreamState) -> bool:
    """A reasoning piece: `reasoning_content` (DeepSeek, vLLM, llama.cpp, LM Studio) or `reasoning`
    (Ollama, OpenRouter), kept apart from the answer. True when the delta carried one."""
    piece = delta.get("reasoning_content") or delta.get("reasoning")
    if not piece:
        return False
    if type(piece) is not str:
        raise TypeError("reasoning is not text")
    state.reasoning.append(piece)
    state.thought = piece
    return True


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)
    return str(error)
