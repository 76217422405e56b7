"""The OpenAI test server, checked with the real openai SDK (sync, async, Azure) as the client."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.fixtures import llm, openai_server  # noqa: F401
from tests.support.openai_script import DEFAULT_TEXT, RECORDINGS, embed, read_recording
from tests.support.openai_server import OpenAIServer, Reply

KEY = "sk-test-key"
MESSAGES: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Say hello to the test suite"}]
REPO = Path(__file__).resolve().parents[1]


def client(server: OpenAIServer, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, **kwargs)


def stream_chunks(server: OpenAIServer, *, usage: bool = True, **kwargs: Any) -> list[ChatCompletionChunk]:
    with client(server, **kwargs) as c:
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
        return list(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, **extra))


def collect_until_error(stream: Any, into: list[ChatCompletionChunk]) -> None:
    for chunk in stream:
        into.append(chunk)


def contents(chunks: list[ChatCompletionChunk]) -> list[str | None]:
    return [c.choices[0].delta.content for c in chunks if c.choices]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# --- normal streams -------------------------------------------------------------------------------

def test_sync_text_stream_has_role_deltas_finish_and_usage(llm: OpenAIServer) -> None:
    llm.script(Reply(text="Hello brave new world"))
    chunks = stream_chunks(llm)
    assert contents(chunks) == ["", "Hello", " brave", " new", " world", None]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # prompt tokens = words in the messages (2 + 6), completion tokens = content deltas
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 4)
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    request = llm.chat_requests[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["stream"] is True and request.body["messages"] == MESSAGES


def test_async_client_default_reply_without_usage(llm: OpenAIServer) -> None:
    async def run() -> list[ChatCompletionChunk]:
        async with openai.AsyncOpenAI(base_url=llm.base_url, api_key=KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert "".join(x or "" for x in contents(chunks)) == DEFAULT_TEXT
    assert contents(chunks)[1:3] == ["Hello", " from"]
    assert all(c.choices for c in chunks), "no usage chunk without stream_options.include_usage"
    assert chunks[0].model == "gpt-4o"
    assert llm.chat_requests[0].headers["x-stainless-async"].startswith("async:")


def test_azure_client_stream_path_key_and_prompt_filter_chunk(llm: OpenAIServer) -> None:
    llm.script(Reply(text="Azure says hi"))
    with openai.AzureOpenAI(api_key="azure-key", api_version="2024-10-21", azure_endpoint=llm.azure_endpoint,
                            azure_deployment="my-gpt4o", max_retries=0) as c:
        chunks = list(c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    request = llm.chat_requests[0]
    assert request.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == "azure-key" and request.deployment == "my-gpt4o"
    # Azure's first event has no choices and an empty object: consumers must not index choices[0].
    assert chunks[0].choices == [] and chunks[0].object == ""
    assert "".join(x or "" for x in contents(chunks)) == "Azure says hi"


def test_azure_rejects_missing_api_version_missing_key_and_unknown_deployment(llm: OpenAIServer) -> None:
    url = f"{llm.azure_endpoint}/openai/deployments/d/chat/completions"
    body = {"messages": MESSAGES}
    with httpx2.Client() as http:
        no_version = http.post(url, json=body, headers={"api-key": "k"})
        no_key = http.post(url, json=body, params={"api-version": "2024-10-21"})
        bearer = http.post(url, json=body, params={"api-version": "2024-10-21"},
                           headers={"authorization": "Bearer aad-token"})
    assert no_version.status_code == 404 and no_version.json()["error"]["code"] == "404"
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "401"
    assert bearer.status_code == 200 and b"data: [DONE]" not in bearer.content  # stream not requested
    llm.deployments = {"exists"}
    with openai.AzureOpenAI(api_key="k", api_version="2024-10-21", azure_endpoint=llm.azure_endpoint,
                            azure_deployment="missing", max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as info:
            c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.code == "DeploymentNotFound"


def test_openai_auth_and_unknown_path(llm: OpenAIServer) -> None:
    llm.require_key = "sk-right"
    with pytest.raises(openai.AuthenticationError) as info:
        stream_chunks(llm)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert str(info.value.request_id).startswith("req_")
    with httpx2.Client() as http:
        missing = http.post(f"{llm.base_url}/chat/completions", json={"messages": MESSAGES})
        unknown = http.post(f"{llm.base_url}/nope", json={}, headers={"authorization": "Bearer sk-right"})
    assert missing.status_code == 401 and "didn't provide an API key" in missing.json()["error"]["message"]
    assert unknown.status_code == 404
    assert unknown.json() == {"error": {"message": "Invalid URL (POST /v1/nope)", "type": "invalid_request_error",
                                        "param": None, "code": None}}
    assert len(llm.chat_requests) == 2, "rejected requests are recorded too"
    assert [r.kind for r in llm.requests].count("other") == 1


@pytest.mark.parametrize("name", ["e2aad469b71d", "c6aa7e397b71", "f82268f2fefd"])
def test_replaying_a_recording_gives_the_recorded_chunks(llm: OpenAIServer, name: str) -> None:
    path = RECORDINGS / f"{name}.sse"
    expected = [json.loads(e[len(b"data: "):]) for e in read_recording(path) if not e.startswith(b"data: [DONE]")]
    llm.script(Reply.from_recording(name))
    chunks = stream_chunks(llm)
    assert [c.to_dict() for c in chunks] == expected
    assert len(chunks) == path.read_bytes().count(b"data: ") - 1


def test_wire_bytes_are_the_recording_one_http_chunk_per_event(llm: OpenAIServer) -> None:
    path = RECORDINGS / "c6aa7e397b71.sse"
    llm.script(Reply.from_recording(path))
    payload = json.dumps({"model": "m", "stream": True, "messages": MESSAGES}).encode()
    with socket.create_connection(("127.0.0.1", llm.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        raw = b""
        while data := sock.recv(65536):
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: text/event-stream; charset=utf-8" in head
    assert b"transfer-encoding: chunked" in head and b"x-request-id: req_" in head
    chunks: list[bytes] = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(body[:size])
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]
    assert chunks == read_recording(path)
    assert b"".join(chunks) == path.read_bytes()


def test_tool_call_stream_accumulates_parallel_arguments(llm: OpenAIServer) -> None:
    llm.script(Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Edinburgh", "units": "c"}},
                                 {"name": "get_stock_price", "arguments": '{"ticker": "AAPL"}'}]))
    chunks = stream_chunks(llm)
    calls: dict[int, dict[str, str]] = {}
    fragments = 0
    for chunk in chunks:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            fragments += 1
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_stock_price"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Edinburgh", "units": "c"}
    assert json.loads(calls[1]["arguments"]) == {"ticker": "AAPL"}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    assert fragments > 6, "arguments must arrive in pieces"
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None and first.tool_calls
    assert chunks[-2].choices[0].finish_reason == "tool_calls"


def test_non_stream_returns_chat_completion_with_tool_calls_and_usage(llm: OpenAIServer) -> None:
    llm.script(Reply(text="Plain answer"), Reply(tool_calls=[{"name": "f", "arguments": {"x": 1}}],
                                                 usage={"prompt_tokens": 11, "completion_tokens": 3}))
    with client(llm) as c:
        first = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        second = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert isinstance(first, ChatCompletion)
    assert first.choices[0].message.content == "Plain answer" and first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.completion_tokens == 2
    tool = second.choices[0].message.tool_calls
    assert tool and tool[0].function.name == "f" and json.loads(tool[0].function.arguments) == {"x": 1}
    assert second.usage is not None and second.usage.total_tokens == 14
    # Both requests went over one kept-alive TCP connection.
    assert len({r.connection for r in llm.chat_requests}) == 1


def test_refusal_content_filter_usage_off_and_responder(llm: OpenAIServer) -> None:
    llm.script(Reply(refusal="I can't help with that."), Reply(text="bad", content_filter=True, usage=False))
    refused = stream_chunks(llm)
    filtered = stream_chunks(llm)
    assert "".join(c.choices[0].delta.refusal or "" for c in refused if c.choices) == "I can't help with that."
    assert refused[0].choices[0].delta.content is None
    assert filtered[-1].choices[0].finish_reason == "content_filter"
    assert all(c.usage is None for c in filtered)
    llm.responder = lambda request: Reply(text=str(request.body["messages"][-1]["content"]).upper())
    echoed = stream_chunks(llm)
    assert "".join(x or "" for x in contents(echoed)) == "SAY HELLO TO THE TEST SUITE"
    llm.responder = lambda request: Reply(text=request.body["no such key"])
    with pytest.raises(openai.InternalServerError) as info:
        stream_chunks(llm, max_retries=2)
    assert "KeyError" in info.value.message and len(llm.errors) == 1
    assert len(llm.chat_requests) == 4, "x-should-retry: false stops the SDK from retrying"


# --- retries and errors before the stream ---------------------------------------------------------

def test_429_with_retry_after_zero_is_retried_with_backoff(llm: OpenAIServer) -> None:
    llm.script(Reply(status=429, retry_after=0), Reply(text="after retry"))
    started = time.monotonic()
    chunks = stream_chunks(llm, max_retries=2)
    elapsed = time.monotonic() - started
    assert "".join(x or "" for x in contents(chunks)) == "after retry"
    assert [r.retry_count for r in llm.chat_requests] == [0, 1]
    # `retry-after: 0` is not honoured as "now": the SDK only uses 0 < value <= 120 and otherwise
    # falls back to exponential backoff (0.5 s minus up to 25 % jitter).
    assert elapsed >= 0.3


def test_retry_after_ms_is_preferred_and_fast_and_errors_carry_request_id(llm: OpenAIServer) -> None:
    llm.script(Reply(status=503, retry_after_ms=5), Reply(status=500, retry_after_ms=5), Reply(text="ok"))
    started = time.monotonic()
    chunks = stream_chunks(llm, max_retries=2)
    assert time.monotonic() - started < 1.0  # the default backoff would be at least 0.375 s + 0.75 s
    assert [r.retry_count for r in llm.chat_requests] == [0, 1, 2]
    assert contents(chunks)[1] == "ok"
    llm.script(Reply(status=429, retry_after=0, error="slow down"))
    with pytest.raises(openai.RateLimitError) as info:
        stream_chunks(llm, max_retries=0)
    assert info.value.message.endswith("slow down") and info.value.response.headers["retry-after"] == "0"
    assert str(info.value.request_id).startswith("req_")


# --- faults inside the stream ---------------------------------------------------------------------

def test_disconnect_after_raises_api_connection_error_after_k_deltas(llm: OpenAIServer) -> None:
    llm.script(Reply(text="one two three four five six", disconnect_after=3))
    got: list[ChatCompletionChunk] = []
    with client(llm) as c:
        stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIConnectionError) as info:
            collect_until_error(stream, got)
    assert contents(got) == ["", "one", " two", " three"]
    assert isinstance(info.value.__cause__, httpx2.RemoteProtocolError)
    assert llm.disconnects == 0, "a server-side abort is not a client disconnect"


def test_malformed_line_raises_json_decode_error(llm: OpenAIServer) -> None:
    llm.script(Reply(text="a b c d", malformed_after=2))
    got: list[ChatCompletionChunk] = []
    with client(llm) as c:
        stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(json.JSONDecodeError):
            collect_until_error(stream, got)
    assert contents(got) == ["", "a", " b"]


def test_error_event_in_stream_raises_plain_api_error(llm: OpenAIServer) -> None:
    llm.script(Reply(text="a b c", error_after=1, error="The server had an error."))
    got: list[ChatCompletionChunk] = []
    with client(llm) as c:
        stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as info:
            collect_until_error(stream, got)
    assert not isinstance(info.value, openai.APIStatusError), "in-stream errors have no status code"
    assert info.value.message == "The server had an error."
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "server_error"
    assert contents(got) == ["", "a"]


def test_missing_done_and_finish_end_silently(llm: OpenAIServer) -> None:
    # The SDK stops iterating at EOF without [DONE] and raises nothing: callers must notice themselves.
    llm.script(Reply(text="cut short", no_done=True), Reply(text="cut short", no_done=True, no_finish=True))
    without_done = stream_chunks(llm)
    without_finish = stream_chunks(llm)
    assert without_done[-1].usage is not None and without_done[-2].choices[0].finish_reason == "stop"
    assert contents(without_finish) == ["", "cut", " short"]
    assert all(c.choices and c.choices[0].finish_reason is None for c in without_finish)
    llm.script(Reply(text="cut short", no_done=True))
    with httpx2.Client() as http:
        raw = http.post(f"{llm.base_url}/chat/completions", headers={"authorization": "Bearer k"},
                        json={"model": "m", "stream": True, "messages": MESSAGES}).content
    assert b"[DONE]" not in raw and raw.endswith(b"\n\n") and b'"finish_reason":"stop"' in raw


def test_stall_longer_than_read_timeout_raises_api_timeout_error(llm: OpenAIServer) -> None:
    llm.script(Reply(text="slow stream here", stall_after=1, stall=5.0))
    got: list[ChatCompletionChunk] = []
    started = time.monotonic()
    with client(llm, timeout=httpx2.Timeout(5.0, read=0.3)) as c:
        stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APITimeoutError):
            collect_until_error(stream, got)
    assert time.monotonic() - started < 4.0  # the stall is 5 s: the read timeout (0.3 s) ended it
    assert contents(got) == ["", "slow"]
    assert llm.wait_for_disconnect(timeout=2.0), "the client gave up, the server must notice"


def test_not_sse_body_gives_zero_chunks_and_no_error(llm: OpenAIServer) -> None:
    llm.script(Reply(text="json instead", not_sse=True))
    assert stream_chunks(llm) == []
    assert llm.chat_requests[0].body["stream"] is True


def test_keepalive_comments_and_pacing_are_invisible_to_the_sdk(llm: OpenAIServer) -> None:
    words = " ".join(f"w{i}" for i in range(10))
    llm.script(Reply(text=words, keepalive=True, chunk_delay=0.02))
    started = time.monotonic()
    chunks = stream_chunks(llm, usage=False)
    assert "".join(x or "" for x in contents(chunks)) == words
    assert time.monotonic() - started >= 10 * 0.02
    llm.script(Reply(text="x y", keepalive=True))
    with httpx2.Client() as http:
        raw = http.post(f"{llm.base_url}/chat/completions", headers={"authorization": "Bearer k"},
                        json={"model": "m", "stream": True, "messages": MESSAGES}).content
    assert raw.count(b": keep-alive\n\n") >= 3 and raw.endswith(b"data: [DONE]\n\n")


def test_client_closing_stream_early_counts_a_disconnect(llm: OpenAIServer) -> None:
    llm.script(Reply(text=" ".join(["word"] * 50), chunk_delay=0.02))
    with client(llm) as c:
        stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        first = [next(stream), next(stream)]
        stream.close()
    assert contents(first) == ["", "word"]
    assert llm.wait_for_disconnect(timeout=2.0)
    assert llm.disconnects == 1 and llm.disconnected.is_set()


def test_async_client_closing_stream_early_counts_a_disconnect(llm: OpenAIServer) -> None:
    llm.script(Reply(text=" ".join(["word"] * 50), chunk_delay=0.02))

    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=llm.base_url, api_key=KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content == "word":
                    break
            await stream.close()

    asyncio.run(run())
    assert llm.wait_for_disconnect(timeout=2.0) and llm.disconnects == 1


# --- embeddings, models, lifecycle ----------------------------------------------------------------

def test_embeddings_dimensions_base64_and_similarity(llm: OpenAIServer) -> None:
    texts = ["the cat sat on the mat", "a cat sat on a mat", "quantum chromodynamics lecture notes"]
    with client(llm) as c:
        default = c.embeddings.create(model="text-embedding-3-small", input=texts)
        large = c.embeddings.create(model="text-embedding-3-large", input="hello")
        other = c.embeddings.create(model="all-minilm-l6-v2", input="hello")
        small = c.embeddings.create(model="text-embedding-3-small", input="hello", dimensions=64)
        as_float = c.embeddings.create(model="text-embedding-3-small", input=texts, encoding_format="float")
        raw_b64 = c.embeddings.create(model="text-embedding-3-small", input="hello", encoding_format="base64")
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model="text-embedding-3-small", input="")
    assert llm.embedding_requests[0].body["encoding_format"] == "base64", "the SDK asks for base64 by default"
    vectors = [d.embedding for d in default.data]
    assert [len(v) for v in vectors] == [1536] * 3
    assert (len(large.data[0].embedding), len(other.data[0].embedding), len(small.data[0].embedding)) == (
        3072, 384, 64)
    assert [d.embedding for d in as_float.data] == vectors
    assert cosine(vectors[0], vectors[1]) >= 0.45 and abs(cosine(vectors[0], vectors[2])) < 0.1
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-5)
    assert isinstance(raw_b64.data[0].embedding, str)
    decoded = struct.unpack("<1536f", base64.b64decode(raw_b64.data[0].embedding))
    assert list(decoded) == embed("hello", 1536)
    with openai.AzureOpenAI(api_key="k", api_version="2024-10-21", azure_endpoint=llm.azure_endpoint,
                            azure_deployment="emb", max_retries=0) as az:
        azure = az.embeddings.create(model="text-embedding-3-small", input=texts[0])
    assert azure.data[0].embedding == vectors[0]
    assert llm.embedding_requests[-1].path == "/openai/deployments/emb/embeddings"


def test_models_list_and_reset(llm: OpenAIServer) -> None:
    with client(llm) as c:
        ids = [m.id for m in c.models.list()]
    assert "gpt-4o-mini" in ids and "text-embedding-3-small" in ids
    llm.script(Reply(text="left over"))
    llm.require_key = "sk-x"
    llm.responder = lambda request: Reply(text="never")
    llm.reset()
    assert (llm.pending, llm.requests, llm.require_key, llm.responder, llm.disconnects) == (0, [], None, None, 0)
    assert "".join(x or "" for x in contents(stream_chunks(llm))) == DEFAULT_TEXT


def test_context_manager_stops_listening() -> None:
    with OpenAIServer() as server:
        port = server.port
        with client(server) as c:
            assert c.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_standalone_process_prints_base_url_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--text", "from afar",
                           "--chunk-delay", "0.001"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0) as c:
                stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "from afar"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
