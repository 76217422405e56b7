"""The chat request built from a template (llm/request_head.py) is the request httpx2's build_request
builds: same URL, headers in the same order, body and extensions, on both kinds of connection, for
every retry count and model, and after the client's cookies or headers change."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import httpx2
import pytest

from flowrunner.connections.openai import open_azure_openai, open_openai
from flowrunner.connections.pool import ResolvedConnection
from flowrunner.llm.request_head import build_chat_request


def _body(model: str, question: str = "é 😀 \"quoted\"") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0.2,
            "stream": True, "stream_options": {"include_usage": True}}


def _reference(llm: Any, url: Any, body: dict[str, Any], retries: int) -> Any:
    return llm.http.build_request("POST", url, json=body,
                                  headers={**llm.headers, "x-stainless-retry-count": str(retries)})


def _assert_same(llm: Any, model: str, retries: int, question: str = "hi") -> None:
    url = llm.chat_url(model)
    built, expected = build_chat_request(llm, url, _body(model, question), retries), \
        _reference(llm, url, _body(model, question), retries)
    assert (built.method, str(built.url)) == (expected.method, str(expected.url))
    assert built.headers.raw == expected.headers.raw
    assert built.content == expected.content
    assert built.extensions == expected.extensions


async def _connections(stack: AsyncExitStack) -> list[Any]:
    return [await open_openai(ResolvedConnection("llm", "openai", {"api_key": "sk-test",
                                                                    "base_url": "http://127.0.0.1:9/v1"}), stack),
            await open_azure_openai(ResolvedConnection("az", "azure_openai", {
                "api_key": "az-key", "endpoint": "https://example.openai.azure.com"}), stack)]


def test_template_request_matches_build_request() -> None:
    async def check() -> None:
        async with AsyncExitStack() as stack:
            for llm in await _connections(stack):
                for model in ("gpt-4o-mini", "other-model", "gpt-4o-mini"):
                    for retries in (0, 2, 1, 0):
                        _assert_same(llm, model, retries, question="a longer question " * retries)
                assert len(llm.requests) == 2  # one template per URL, reused
    asyncio.run(check())


def test_changed_client_is_followed() -> None:
    async def check() -> None:
        async with AsyncExitStack() as stack:
            llm = (await _connections(stack))[0]
            _assert_same(llm, "gpt-4o-mini", 0)
            llm.http.headers["x-extra"] = "1"  # the template was made without it
            _assert_same(llm, "gpt-4o-mini", 0)
            assert llm.http.build_request("GET", "http://x/").headers["x-extra"] == "1"
            llm.http.cookies.set("session", "abc", domain="127.0.0.1")  # a cookie the server set
            _assert_same(llm, "gpt-4o-mini", 1)
            assert "session=abc" in build_chat_request(llm, llm.chat_url("gpt-4o-mini"), _body("m"), 0) \
                .headers["cookie"]
    asyncio.run(check())


class _Body(httpx2.AsyncByteStream):
    """A response body that arrives in the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> Any:
        for piece in self.pieces:
            yield piece

    async def aclose(self) -> None:
        pass


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("headers, body, size", [
    ({}, 'data: {"a": "é😀"}\n\ndata: two\ndata: lines\n\n: comment\n\ndata: [DONE]\n\n'.encode(), 1),
    ({}, 'data: {"a": "é😀"}\r\n\r\ndata: x\r\n\r\n'.encode() + b"data: bad \xff byte\n\n" + b"data: cut\n\n\xf0\x9f", 3),
    ({"content-encoding": "gzip"}, 'data: {"a": "é😀"}\n\ndata: [DONE]\n\n'.encode(), 5),
    ({"content-type": "text/event-stream; charset=latin-1"}, "data: café\n\ndata: [DONE]\n\n".encode("latin-1"), 2),
])
def test_sse_data_reads_the_body_as_aiter_text_does(headers: dict[str, str], body: bytes, size: int) -> None:
    """sse_data decodes the bytes itself (one async generator fewer per read): the events are those of
    httpx2's aiter_text, split anywhere, compressed or not, in the charset the server names."""
    import gzip

    from flowrunner.llm.sse import Events, sse_data

    sent = gzip.compress(body) if headers.get("content-encoding") == "gzip" else body
    all_headers = {"content-type": "text/event-stream", **headers}

    async def events(read: Any) -> list[str]:
        response = httpx2.Response(200, headers=all_headers, stream=_Body(_split(sent, size)))
        return [data async for data in read(response)]

    async def reference(response: Any) -> Any:
        parser = Events()
        async for text in response.aiter_text():
            for data in parser.feed(text):
                yield data
        for data in parser.end():
            yield data

    got, expected = asyncio.run(events(sse_data)), asyncio.run(events(reference))
    assert got == expected and len(got) >= 2


def test_runtime_check_skips_only_what_any_text_satisfies() -> None:
    """A text for a property that takes any text (a prompt, a model) is not run through the validator;
    a text for a constrained one (minLength, a pattern) still is, and a non-text anywhere too."""
    from flowrunner.flow.schema import runtime_problems

    props = {"model": "gpt", "user_prompt": "", "safety_identifier": "", "temperature": "warm", "system_prompt": 3}
    assert runtime_problems("chat_completion", props, list(props)) == [
        "safety_identifier: must not be empty", "temperature: expected a number or null, got a string 'warm'",
        "system_prompt: expected a string, got an integer 3"]
    assert runtime_problems("history_load", {"table": "no such-table"}, ["table"])  # a pattern: still checked
