"""The OpenAI chat-completions protocol, server side: a request checked and read, and the exact
response, chunk and error shapes (shared/reference/openai-streaming-wire-format.md)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .wire import json_text

ROLES = {"system", "developer", "user", "assistant", "tool"}
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# What a request body may hold. Python's json module would otherwise turn each of these into a 500:
# deep nesting is a RecursionError, an integer of more than 4300 digits a ValueError, a 400-digit
# one an OverflowError as a `number` input, and a lone surrogate (`"\ud800"`, valid JSON but not
# Unicode) a UnicodeEncodeError wherever the text is written out again.
# These differ from flow.load's MAX_DEPTH and MAX_INT_DIGITS on purpose: they bound the whole body a
# client sends (its envelope adds levels around any value), not one value of a flow, and a number to
# what a JSON client can mean by it. A flow input inside the body is still held to flow.load's limits
# when it is resolved (a 400 naming the input).
MAX_DEPTH = 128  # levels of nested arrays and objects (serde_json's default)
MAX_DIGITS = 300  # digits of a number: beyond what a double holds (about 1.8e308), nothing is exact
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _BadNumber(Exception):
    pass


def _int(text: str) -> int:
    if len(text) > MAX_DIGITS + 1:  # + a minus sign
        raise _BadNumber(f"a number in the request body has more than {MAX_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadNumber(f"a number in the request body is too large for a double ({text[:20]}...)")
    return value


def _constant(text: str) -> Any:
    raise _BadNumber(f"the request body is not valid JSON: {text} is not a JSON number")


def read_json(raw: bytes) -> Any:
    """The request body, parsed; or BadRequest (400) for anything that is not plain JSON text: not
    UTF-8, not JSON, nested deeper than MAX_DEPTH, a number beyond MAX_DIGITS or a double, NaN or
    Infinity, a lone surrogate in a string or a key."""
    try:
        body = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise BadRequest(f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except _BadNumber as e:
        raise BadRequest(str(e)) from None
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8 text") from None
    except json.JSONDecodeError as e:
        # removesuffix: json's own "Invalid control character at" would read "at at line"
        raise BadRequest(f"the request body is not valid JSON ({e.msg.removesuffix(' at')} at line {e.lineno} "
                         f"column {e.colno})") from None
    except ValueError:  # bytes json.loads cannot even decode (a UTF-16 BOM without its pair...)
        raise BadRequest("the request body is not valid JSON") from None
    # The walk costs a little, so it runs only when a body could be too deep or hold a surrogate
    # (an escaped one: raw UTF-8 cannot hold a surrogate, and json.loads refused any that did).
    texts = _SURROGATE_ESCAPE.search(raw) is not None
    if texts or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_tree(body, texts)
    return body


def _check_tree(body: Any, texts: bool) -> None:
    """BadRequest for nesting deeper than MAX_DEPTH, and (`texts`) for a lone surrogate."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if texts:
                _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise BadRequest(f"the request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if texts:
                    _check_text(key, path or "(body)")
                stack.append((item, depth + 1, f"{path}.{key}" if path else key))
        else:
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Never echo the character: it cannot be written out as UTF-8, which is the point.
        raise BadRequest(f"the request body holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not "
                         "Unicode text: send each character whole (or as a surrogate pair)", path or None) from None


@dataclass(frozen=True)
class ChatRequest:
    text: str  # the last user message
    earlier: list[dict[str, str]]  # the messages before it, as {role, content}
    model: str | None
    stream: bool
    include_usage: bool
    conversation_id: str | None
    inputs: Mapping[str, Any] = field(default_factory=dict)  # extra flow inputs (`inputs` in the body)
    images: list[Any] = field(default_factory=list)  # the last message's image URLs (or {url, detail})


def _text(content: Any, where: str, images: list[Any] | None = None) -> str | None:
    """A message's text. `images`: a list when the flow takes images, which gets the message's image
    URLs (as {url, detail} when a detail is given); None refuses image parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "image_url" and images is not None:
                images.append(_image(part, f"{where}.content[{i}]"))
                continue
            if kind != "text" or not isinstance(part.get("text"), str):
                if kind == "image_url":
                    raise BadRequest("this flow takes no images (an 'image_url' part): a flow takes them through an "
                                     "array input named `images`", f"{where}.content[{i}]")
                raise BadRequest(f"only text content parts are supported, got {kind!r}", f"{where}.content[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest("content must be a string or a list of text parts", f"{where}.content")


def _image(part: dict[str, Any], where: str) -> Any:
    """An image_url part's URL: an https:, http: or data:image/ URL (never a file name: the flow
    reads files only from its own folder, and only its author names them)."""
    image = part.get("image_url")
    return image_ref(image.get("url") if isinstance(image, dict) else None,
                     image.get("detail") if isinstance(image, dict) else None, where, "image_url.url", "image_url.detail")


def image_ref(url: Any, detail: Any, where: str, url_key: str, detail_key: str) -> Any:
    """An image part's URL, or {url, detail}, as the flow's `images` input takes it; `where` and the
    keys name the part's fields in an error (a chat completion's image_url.url, a response's image_url)."""
    from ..llm.images import DETAILS

    if not isinstance(url, str) or not url.lower().startswith(("https://", "http://", "data:image/")):
        raise BadRequest(f"an image part needs {url_key}: an https: URL or a data:image/... URL", f"{where}.{url_key}")
    if detail is None:
        return url
    if detail not in DETAILS:
        raise BadRequest(f"{detail_key} must be one of {', '.join(DETAILS)}", f"{where}.{detail_key}")
    return {"url": url, "detail": detail}


def parse_request(body: Any, conversation_header: str | None = None, *, images: bool = False) -> ChatRequest:
    """`images`: the flow takes images (ChatInputs.images): image parts are accepted, the last
    message's become ChatRequest.images, and an earlier message keeps its parts (text and images)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of {role, content} messages", "messages")
    parsed: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise BadRequest(f"messages[{i}] needs a role: one of {', '.join(sorted(ROLES))}", f"messages[{i}].role")
        found: list[Any] | None = [] if images else None
        text = _text(m.get("content"), f"messages[{i}]", found)
        parsed.append({"role": m["role"], "content": text, "images": found})
    last = parsed[-1]
    if last["role"] != "user" or not (last["content"] or last["images"]):
        raise BadRequest("the last message must be the user's, with text (role: user)", f"messages[{len(parsed) - 1}]")
    for key, kind in (("stream", bool), ("model", str), ("conversation_id", str), ("inputs", dict),
                      ("stream_options", dict), ("metadata", dict)):
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise BadRequest(f"'{key}' must be a {'boolean' if kind is bool else 'string' if kind is str else 'object'}",
                             key)
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    named = (body.get("conversation_id"), (body.get("metadata") or {}).get("conversation_id"), conversation_header)
    conversation = next((c for c in named if c is not None), None)
    if conversation is not None and (not isinstance(conversation, str) or not conversation.strip()):
        raise BadRequest("conversation_id must be a non-empty string", "conversation_id")
    earlier = [{"role": m["role"], "content": _parts(m) or m["content"]} for m in parsed[:-1]
               if m["role"] in ("system", "developer", "user", "assistant") and (m["content"] or m["images"])]
    return ChatRequest(last["content"] or "", earlier, body.get("model"), bool(body.get("stream")),
                       bool((body.get("stream_options") or {}).get("include_usage")), conversation,
                       body.get("inputs") or {}, last["images"] or [])


def _parts(message: dict[str, Any]) -> list[dict[str, Any]] | None:
    """An earlier message with images as content parts (its text, then its images), as the chat
    step sends a user message with images; None for a message of text only."""
    if not message["images"]:
        return None
    from ..llm.images import image_part

    text = [{"type": "text", "text": message["content"]}] if message["content"] else []
    return text + [image_part(item) for item in message["images"]]


class Shapes:
    """The response shapes of one completion: one id, one `created`, one model name."""

    def __init__(self, model: str) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        head = _dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                       "system_fingerprint": None})[:-1]
        # A content chunk is the bulk of the traffic: built from two fixed halves around the text.
        self._content_head = ("data: " + head + ',"choices":[{"index":0,"delta":{"content":').encode()
        self._content_tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        # A reasoning model's thinking, as DeepSeek and vLLM send it (the openai SDK keeps the field).
        self._reasoning_head = ("data: " + head + ',"choices":[{"index":0,"delta":{"reasoning_content":').encode()
        self._head = head

    def role_chunk(self) -> bytes:
        return self._chunk({"role": "assistant", "content": "", "refusal": None}, None)

    def content_chunk(self, text: str) -> bytes:
        return self._content_head + json_text(text) + self._content_tail  # per delta: wire.py

    def reasoning_chunk(self, text: str) -> bytes:
        return self._reasoning_head + json_text(text) + self._content_tail

    def refusal_chunk(self, refusal: str) -> bytes:
        return self._chunk({"refusal": refusal}, None)

    def finish_chunk(self, finish_reason: str) -> bytes:
        return self._chunk({}, finish_reason)

    def usage_chunk(self, usage: Mapping[str, Any] | None) -> bytes:
        return f"data: {self._head},\"choices\":[],\"usage\":{_dumps(usage_or_zero(usage))}}}\n\n".encode()

    def error_event(self, message: str, type_: str, code: int | str | None) -> bytes:
        return f"data: {_dumps(error_body(message, type_, None, code))}\n\n".encode()

    def tail(self, answer: Any, error: Mapping[str, Any] | None, include_usage: bool) -> bytes:
        """The end of a stream (answer: serve.answer.Answer): the finish chunk, usage when asked, [DONE];
        or, after a failure (`error`: the error body's object), the error event and no [DONE]."""
        if error is not None:
            return self.error_event(error["message"], error["type"], error["code"])
        # The model's refusal, in one piece at the end (the flow's steps see it once the step ends).
        tail = self.refusal_chunk(answer.refusal) if answer.refusal else b""
        tail += self.finish_chunk(answer.finish_reason or "stop")
        if include_usage:
            tail += self.usage_chunk(answer.usage)
        return tail + DONE

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return f"data: {self._head},\"choices\":[{_dumps(choice)}]}}\n\n".encode()

    def completion(self, text: str, finish_reason: str, usage: Mapping[str, Any] | None,
                   refusal: str | None = None, reasoning: str | None = None) -> dict[str, Any]:
        content = None if refusal and not text else text  # OpenAI's refusal: content null, refusal set
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal, "annotations": []}
        if reasoning:  # only from a reasoning model, as DeepSeek sends it
            message["reasoning_content"] = reasoning
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage_or_zero(usage), "system_fingerprint": None}


def usage_or_zero(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    base = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {**base, **(usage or {})}
