"""The reply model of the OpenAI test server: what to answer and how to misbehave.

This module is pure (no sockets): it turns a `Reply` plus the request body into the exact SSE events
(bytes) or JSON bodies that `openai_server.py` writes on the wire. The shapes follow
OpenAI's streaming wire format and the real streams recorded in `tests/data/recorded-streams/`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import re
import secrets
import string
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any


# Real streams recorded from the OpenAI API, kept in the repository: a fresh clone has nothing beside it.
RECORDINGS: Path = Path(__file__).resolve().parents[1] / "data" / "recorded-streams"

DEFAULT_TEXT = "Hello from the flowrunner test server."
DEFAULT_CHAT_MODEL = "gpt-4o-mini"
FINGERPRINT = "fp_flowrunner"

_ALNUM = string.ascii_letters + string.digits


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def dumps(obj: Any) -> str:
    """Compact JSON exactly like the API (no spaces after separators, non-ASCII kept)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


DONE_EVENT = b"data: [DONE]\n\n"
KEEPALIVE_EVENT = b": keep-alive\n\n"


def split_words(text: str) -> list[str]:
    """Split like the model's tokens look on the wire: leading whitespace sticks to the next word."""
    return re.findall(r"\s*\S+|\s+$", text)


def split_arguments(arguments: str) -> list[str]:
    """Split tool arguments into pieces shaped like the recordings (`{"`, `city`, `":"`, ...)."""
    return re.findall(r"\w+|\s+|[^\w\s]+", arguments) or [arguments]


@dataclass
class Reply:
    """One scripted answer to a chat request. Every fault knob counts k in events sent after the role chunk."""

    text: str | list[str] | None = None  # str is split into word deltas; a list is sent as given
    tool_calls: list[dict[str, Any]] | None = None  # {name, arguments: str|dict, id?, pieces?}
    refusal: str | None = None
    finish_reason: str | None = None  # default: stop, or tool_calls when tool_calls are given
    content_filter: bool = False  # finish_reason content_filter
    usage: dict[str, Any] | bool | None = None  # None: computed; False: no usage at all; dict: overrides
    model: str | None = None  # default: the request's model (Azure: the deployment when absent)
    id: str | None = None
    chunk_delay: float = 0.0  # seconds between events
    # chunk_delay as a schedule (event k due k x delay after the first) rather than a pause after each
    # send: a busy server keeps the pace instead of drifting slower (bench/serve_capacity.py).
    paced: bool = False
    chunk_extra: dict[str, Any] = field(default_factory=dict)  # extra keys on every chunk (service_tier...)
    # An error reply before any stream: non-2xx status with an OpenAI-shaped body.
    status: int = 200
    retry_after: float | str | None = None  # `retry-after` header (seconds)
    retry_after_ms: float | None = None  # `retry-after-ms` header; the SDK prefers it
    error: dict[str, Any] | str | None = None  # message, or the fields of the `error` object
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    # Faults inside a 200 stream.
    disconnect_after: int | None = None  # close TCP mid chunked body
    malformed_after: int | None = None  # one `data:` line of invalid JSON, then carry on
    stall_after: int | None = None
    stall: float = 0.0
    error_after: int | None = None  # `data: {"error":{...}}` then end the body without [DONE]
    no_done: bool = False
    no_finish: bool = False  # also drop the finish and usage chunks
    not_sse: bool = False  # 200 application/json completion body although stream was requested
    keepalive: bool = False  # `: keep-alive` comment before every event after the first
    replay: str | Path | None = None  # a recorded .sse file, sent event by event
    azure_prompt_filter: bool | None = None  # None: on for Azure paths (a `choices:[]` chunk first)
    # A reasoning model's thinking, streamed before the text (str: word deltas; a list as given), as
    # delta.reasoning_content (DeepSeek, vLLM, llama.cpp) or, with reasoning_field="reasoning", as
    # Ollama and OpenRouter send it; in a stream: false reply, message.<reasoning_field>.
    reasoning: str | list[str] | None = None
    reasoning_field: str = "reasoning_content"
    # A threading.Event: the reply waits (other connections go on) until the test sets it, e.g. when
    # another request arrives; one never set within HOLD_LIMIT is recorded in the server's `errors`.
    hold: Any = None
    sent: Any = None  # a threading.Event the server sets once the whole stream (to [DONE]) is sent

    @classmethod
    def from_recording(cls, name_or_path: str | Path, **kwargs: Any) -> Reply:
        """`Reply.from_recording("e2aad469b71d")` or a path to any .sse file."""
        path = Path(name_or_path)
        if not path.exists():
            path = RECORDINGS / (str(name_or_path) if str(name_or_path).endswith(".sse") else f"{name_or_path}.sse")
        return cls(replay=path, **kwargs)

    def replace(self, **changes: Any) -> Reply:
        return dataclasses.replace(self, **changes)


def read_recording(path: str | Path) -> list[bytes]:
    """The events of a recorded stream, each with its trailing blank line, [DONE] included."""
    raw = Path(path).read_bytes().replace(b"\r\n", b"\n")
    return [part + b"\n\n" for part in raw.split(b"\n\n") if part.strip()]


def count_words(messages: Any) -> int:
    """Deterministic stand-in for prompt tokens: whitespace-separated words in every message text."""
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    return total


@dataclass
class StreamPlan:
    """What to stream. `head` is sent first and never counted; fault positions index into `body`."""

    head: list[bytes]
    body: list[bytes]
    done: bool
    malformed: bytes
    error_event: bytes


def _truncated(event: bytes) -> bytes:
    """A real chunk cut in half: the kind of invalid JSON a broken proxy produces."""
    return event[: len(event) // 2].rstrip(b"\n") + b"\n\n"


@dataclass
class _Turn:
    """The normalised content of a reply: lists of wire fragments."""

    text: list[str] | None
    refusal: list[str] | None
    calls: list[dict[str, Any]]  # {id, name, arguments, pieces}
    finish_reason: str

    @property
    def fragments(self) -> int:
        """Completion tokens by default: one per content, refusal or argument delta."""
        return len(self.text or []) + len(self.refusal or []) + sum(len(c["pieces"]) for c in self.calls)


def _turn(reply: Reply) -> _Turn:
    text: list[str] | None
    if isinstance(reply.text, list):
        text = list(reply.text)
    elif reply.text is not None:
        text = split_words(reply.text)
    else:
        text = None
    refusal = split_words(reply.refusal) if reply.refusal is not None else None
    calls: list[dict[str, Any]] = []
    for spec in reply.tool_calls or []:
        args = spec.get("arguments", "")
        args_text = args if isinstance(args, str) else dumps(args)
        pieces = list(spec.get("pieces") or split_arguments(args_text))
        calls.append({"id": spec.get("id") or f"call_{_rand(24)}", "name": spec["name"],
                      "arguments": "".join(pieces), "pieces": pieces})
    if text is None and refusal is None and not calls:
        text = []
    if reply.content_filter:
        finish = "content_filter"
    else:
        finish = reply.finish_reason or ("tool_calls" if calls else "stop")
    return _Turn(text=text, refusal=refusal, calls=calls, finish_reason=finish)


def _reasoning_pieces(reply: Reply) -> list[str]:
    if reply.reasoning is None:
        return []
    return list(reply.reasoning) if isinstance(reply.reasoning, list) else split_words(reply.reasoning)


def _usage(reply: Reply, body: dict[str, Any], completion_tokens: int) -> dict[str, Any] | None:
    if reply.usage is False:
        return None
    prompt = count_words(body.get("messages"))
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                             "total_tokens": prompt + completion_tokens,
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    if isinstance(reply.usage, dict):
        usage.update(reply.usage)
        if "total_tokens" not in reply.usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def stream_error_object(reply: Reply) -> dict[str, Any]:
    base: dict[str, Any] = {"message": "The server had an error while processing your request. Sorry about that!",
                            "type": "server_error", "param": None, "code": None}
    if isinstance(reply.error, str):
        base["message"] = reply.error
    elif isinstance(reply.error, dict):
        base.update(reply.error)
    return {"error": base}


class ChatRender:
    """Renders one reply for one request; id/created/model are fixed so every chunk carries the same ones."""

    def __init__(self, reply: Reply, body: dict[str, Any], *, azure: bool, deployment: str | None) -> None:
        self.reply = reply
        self.body = body
        self.azure = azure
        self.id = reply.id or f"chatcmpl-{_rand(29)}"
        self.created = int(time.time())
        self.model = reply.model or str(body.get("model") or deployment or DEFAULT_CHAT_MODEL)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "system_fingerprint": FINGERPRINT}
        obj.update(self.reply.chunk_extra)
        obj["choices"] = choices
        obj.update(extra)
        return sse(obj)

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def _azure_filter_chunk(self) -> bytes:
        # Azure's first event: empty object/model/id, `choices: []`, prompt filter annotations.
        safe = {"filtered": False, "severity": "safe"}
        return sse({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {
                        "hate": safe, "self_harm": safe, "sexual": safe, "violence": safe}}]})

    def stream_plan(self) -> StreamPlan:
        reply = self.reply
        error_event = sse(stream_error_object(reply))
        if reply.replay is not None:
            events = read_recording(reply.replay)
            had_done = bool(events) and events[-1].startswith(b"data: [DONE]")
            if had_done:
                events = events[:-1]
            return StreamPlan(head=events[:1], body=events[1:], done=had_done and not reply.no_done,
                              malformed=_truncated(events[-1]), error_event=error_event)
        turn = _turn(reply)
        head: list[bytes] = []
        if reply.azure_prompt_filter if reply.azure_prompt_filter is not None else self.azure:
            head.append(self._azure_filter_chunk())
        body: list[bytes] = []
        role_sent = turn.text is not None or turn.refusal is not None
        for piece in _reasoning_pieces(reply):
            if reply.reasoning_field == "reasoning":  # Ollama's shape: role and an empty content on each
                body.append(self._delta({"role": "assistant", "content": "", "reasoning": piece}))
            else:  # DeepSeek's: content null beside the reasoning
                body.append(self._delta({"content": None, reply.reasoning_field: piece}))
        if turn.text is not None:
            head.append(self._delta({"role": "assistant", "content": "", "refusal": None}))
            for piece in turn.text:
                body.append(self._delta({"content": piece}))
        elif turn.refusal is not None:
            head.append(self._delta({"role": "assistant", "content": None, "refusal": ""}))
        for piece in turn.refusal or []:
            body.append(self._delta({"refusal": piece}))
        for index, call in enumerate(turn.calls):
            opening = {"index": index, "id": call["id"], "type": "function",
                       "function": {"name": call["name"], "arguments": ""}}
            if not role_sent:
                role_sent = True
                # Straight to tools: the role rides on the first fragment, as in c6aa7e397b71.
                head.append(self._delta({"role": "assistant", "content": None, "tool_calls": [opening],
                                         "refusal": None}))
            else:
                body.append(self._delta({"tool_calls": [opening]}))
            for piece in call["pieces"]:
                body.append(self._delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
        if not reply.no_finish:
            body.append(self._delta({}, turn.finish_reason))
            usage = _usage(reply, self.body, turn.fragments)
            options = self.body.get("stream_options")
            if usage is not None and isinstance(options, dict) and options.get("include_usage"):
                body.append(self._chunk([], usage=usage))
        return StreamPlan(head=head, body=body, done=not reply.no_done, malformed=_truncated((body or head)[-1]),
                          error_event=error_event)

    def completion(self) -> dict[str, Any]:
        """The `stream: false` answer (also the body of a `not_sse` reply)."""
        turn = _turn(self.reply)
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(turn.text) if turn.text is not None else None,
                                   "refusal": "".join(turn.refusal) if turn.refusal is not None else None,
                                   "annotations": []}
        if self.reply.reasoning is not None:
            message[self.reply.reasoning_field] = "".join(_reasoning_pieces(self.reply))
        if turn.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in turn.calls]
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion", "created": self.created,
                               "model": self.model,
                               "choices": [{"index": 0, "message": message, "logprobs": None,
                                            "finish_reason": turn.finish_reason}]}
        usage = _usage(self.reply, self.body, turn.fragments)
        if usage is not None:
            obj["usage"] = usage
        obj["system_fingerprint"] = FINGERPRINT
        obj.update(self.reply.chunk_extra)
        return obj


# --- errors -------------------------------------------------------------------------------------

_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
    408: ("Request timed out.", "timeout", None),
    429: ("Rate limit reached for requests. Please try again in 0s.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def error_body(status: int, error: dict[str, Any] | str | None = None, *, param: str | None = None,
               code: str | None | EllipsisType = ...) -> dict[str, Any]:
    """An OpenAI-shaped error: {"error":{"message","type","param","code"}}; `code=...` means the status default."""
    message, kind, default_code = _STATUS_ERRORS.get(status, ("Error.", "server_error" if status >= 500
                                                              else "invalid_request_error", None))
    obj: dict[str, Any] = {"message": message, "type": kind, "param": param,
                           "code": default_code if code is ... else code}
    if isinstance(error, str):
        obj["message"] = error
    elif isinstance(error, dict):
        obj.update(error)
    return {"error": obj}


def azure_error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# --- requests and auth --------------------------------------------------------------------------

@dataclass
class RecordedRequest:
    """One request as the server saw it (headers lowercased, body parsed as JSON when possible)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    received_at: float  # time.monotonic()
    kind: str  # "chat" | "embeddings" | "models" | "other"
    azure: bool = False
    deployment: str | None = None
    connection: int = 0  # which TCP connection carried it: equal numbers mean keep-alive reuse

    @property
    def json(self) -> Any:
        return self.body

    @property
    def retry_count(self) -> int:
        """The SDK's attempt number (X-Stainless-Retry-Count), 0 for the first try."""
        try:
            return int(self.headers.get("x-stainless-retry-count", "0"))
        except ValueError:
            return -1


def auth_error_response(request: RecordedRequest, require_key: str | None) -> tuple[int, dict[str, Any]] | None:
    """None when the key is acceptable, else the (401, body) the real service would send."""
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if request.azure:
        key = request.headers.get("api-key", "") or token
        if key and (require_key is None or key == require_key):
            return None
        return 401, azure_error_body("401", "Access denied due to invalid subscription key or wrong "
                                     "API endpoint. Make sure to provide a valid key for an active "
                                     "subscription and use a correct regional API endpoint for your resource.")
    if not token:
        return 401, error_body(401, "You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                               code=None)
    if require_key is not None and token != require_key:
        return 401, error_body(401, f"Incorrect API key provided: {token[:3]}***{token[-4:]}. You can find "
                               "your API key at https://platform.openai.com/account/api-keys.")
    return None


# --- embeddings ---------------------------------------------------------------------------------

_EMBED_DEFAULT_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
                       "text-embedding-ada-002": 1536}


def default_dimensions(model: str) -> int:
    return _EMBED_DEFAULT_DIMS.get(model, 384)


def embed(text: str, dimensions: int) -> list[float]:
    """Hashed bag of words: texts sharing words share signed buckets, so their cosine is higher.

    Values are rounded to float32 so the `float` and `base64` encodings carry identical numbers.
    """
    vector = [0.0] * dimensions
    words = re.findall(r"\w+", text.lower()) or [""]
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        number = int.from_bytes(digest, "little")
        vector[number % dimensions] += 1.0 if (number >> 63) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:  # every word cancelled out; any fixed unit vector keeps the result finite
        vector[0], norm = 1.0, 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in vector))
    return list(struct.unpack(f"<{dimensions}f", packed))


def encode_base64(vector: list[float]) -> str:
    # The SDK decodes with array("f") / numpy float32: little-endian float32 on every platform we run.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_response(body: dict[str, Any], model_hint: str | None) -> tuple[int, dict[str, Any]]:
    """(status, JSON) for an embeddings request, with the API's validation errors."""
    model = str(body.get("model") or model_hint or "")
    raw = body.get("input")
    if raw is None:
        return 400, error_body(400, "Missing required parameter: 'input'.", param="input",
                               code="missing_required_parameter")
    items: list[Any] = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and
                                                          isinstance(raw[0], int)) else list(raw)
    texts: list[str] = []
    for item in items:
        # Token arrays are embedded by their token numbers, which is deterministic and good enough.
        text = item if isinstance(item, str) else " ".join(f"tok{t}" for t in item)
        if not text:
            return 400, error_body(400, "'$.input' is invalid. Please check the API reference.", param="input")
        texts.append(text)
    if not texts:
        return 400, error_body(400, "'$.input' is invalid. Please check the API reference.", param="input")
    dims = body.get("dimensions", default_dimensions(model))
    if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
        return 400, error_body(400, f"Invalid value for 'dimensions': {dims!r}.", param="dimensions")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return 400, error_body(400, f"Invalid value for 'encoding_format': {fmt!r}.", param="encoding_format")
    data: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        vector = embed(text, dims)
        data.append({"object": "embedding", "index": index,
                     "embedding": encode_base64(vector) if fmt == "base64" else vector})
    tokens = sum(len(t.split()) for t in texts)
    return 200, {"object": "list", "data": data, "model": model,
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


MODELS: list[str] = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small",
                     "text-embedding-3-large"]


def models_response() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 1715367049,
                                         "owned_by": "system"} for m in MODELS]}
