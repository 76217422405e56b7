"""`flowrunner serve` end to end: the real CLI in a child process, the real openai SDK as the client, the
local OpenAI-protocol test server as the flow's model. Streaming, cancellation, concurrency, errors,
history and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import openai
import pytest

from flowrunner.connections.openai import DEFAULT_MAX_RETRIES
from tests.conftest import ROOT
from tests.support.fixtures import Reply

LLM_CONNECTION = """
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}"}"""

CHAT_FLOW = f"""
version: 1
name: served-chat
inputs:
  question: {{type: string}}
  tone: {{type: string, default: plain}}
connections:{LLM_CONNECTION}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    system_prompt: You are the served test flow, tone ${{inputs.tone}}.
    user_prompt: ${{inputs.question}}
outputs:
  answer: ${{response}}
"""
SYSTEM = {"role": "system", "content": "You are the served test flow, tone plain."}

HISTORY_FLOW = f"""
version: 1
name: served-history
inputs:
  question: {{type: string}}
  conversation_id: {{type: string, default: unnamed}}
connections:{LLM_CONNECTION}
  history: {{type: sqlite, path: history.sqlite3}}
steps:
  - {{id: recall, type: history_load, connection: history, conversation_id: "${{inputs.conversation_id}}",
      create: true, result: history}}
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    system_prompt: Remember.
    user_prompt: ${{inputs.question}}
    history: ${{history}}
  - {{id: remember, type: history_save, connection: history, conversation_id: "${{inputs.conversation_id}}",
      user_prompt: "${{inputs.question}}", response: "${{response}}", create: true}}
"""
STALLED = dict(stall=600)  # longer than any test: only a closed connection ends it


# --- the serve process --------------------------------------------------------------------------

class Server:
    """A running `flowrunner serve`; its stderr is drained into `lines` by a thread."""

    def __init__(self, flow: Path, base_url: str, *args: str) -> None:
        env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-test-upstream"}
        env.pop("FLOWRUNNER_PLUGINS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "serve", str(flow), "--port", "0", *args],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready: queue.Queue[str | None] = queue.Queue()
        self.drainer = threading.Thread(target=self._drain, args=(ready,), daemon=True)
        self.drainer.start()
        try:
            line = ready.get(timeout=30)
        except queue.Empty:
            line = None
        if line is None:
            self.stop()
            pytest.fail(f"serve did not start (exit {self.proc.returncode}):\n{self.stderr}")
        match = re.fullmatch(r"serving flow '(.+)' at (http://127\.0\.0\.1:\d+/v1) \(model '\1'\); Ctrl-C stops\n",
                             line)
        assert match, line
        self.name, self.url = match.groups()

    def _drain(self, ready: queue.Queue[str | None]) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(line)
            if line.startswith("serving flow"):
                ready.put(line)
        ready.put(None)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def events(self, event: str) -> list[dict]:
        """serve's JSON log lines of `event` (e.g. "request") so far."""
        out = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
        return out

    def client(self, kind: type = openai.OpenAI, **kw):
        """The real SDK (openai.OpenAI, or kind=openai.AsyncOpenAI) pointed at the served flow, no retries."""
        return kind(base_url=self.url, **{"api_key": "sk-client", "max_retries": 0, "timeout": 30, **kw})

    def post(self, body: bytes | dict, **kw) -> httpx2.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx2.post(f"{self.url}/chat/completions", content=content, timeout=30,
                           headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process ended and all its stderr is in `lines`."""
        code = self.proc.wait(timeout=timeout)
        self.drainer.join(timeout=10)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(timeout=10)


def serving(base_url: str, folder: Path, *extra: str):
    """The `serve` fixtures' body (here, and with --workers in test_serve_workers.py): start(flow_text,
    *args) starts a serve process with `extra` and `args`; each is stopped at teardown."""
    started: list[Server] = []

    def start(flow_text: str, *args: str) -> Server:
        flow = folder / f"flow{len(started)}.yaml"
        flow.write_text(flow_text, encoding="utf-8")
        started.append(Server(flow, base_url, *extra, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def serve(openai_server, tmp_path):
    """serve(flow_text, *args): a serve process for this test only, stopped at teardown."""
    yield from serving(openai_server.base_url, tmp_path)


@pytest.fixture(scope="module")
def chat_server(openai_server, tmp_path_factory):
    """The chat flow, served once for the module; each test scripts the model through `llm`."""
    yield from served_once(openai_server.base_url, tmp_path_factory.mktemp("serve"))


def served_once(base_url: str, folder: Path, *extra: str):
    """The `chat_server` fixtures' body: CHAT_FLOW served with `extra`, stopped at teardown."""
    servers = serving(base_url, folder, *extra)
    yield next(servers)(CHAT_FLOW)
    next(servers, None)  # stops it


@pytest.fixture
def served(chat_server, llm) -> Server:
    return chat_server


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


USAGE = {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}


# --- answers --------------------------------------------------------------------------------------

def test_sync_client_without_streaming(served, llm) -> None:
    llm.script(Reply(text=["Forty", " two", ", of", " course."], usage=USAGE))
    reply = served.client().chat.completions.create(model=served.name, messages=user("What is six times seven?"))
    assert reply.choices[0].message.content == "Forty two, of course."
    assert reply.choices[0].finish_reason == "stop" and reply.model == "served-chat"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (17, 4, 21)
    assert llm.chat_requests[-1].body["messages"] == [SYSTEM, {"role": "user", "content": "What is six times seven?"}]


def test_sync_client_streaming_with_usage(served, llm) -> None:
    llm.script(Reply(text=["Stream", "ing", " works", "."], usage=USAGE))
    stream = served.client().chat.completions.create(model=served.name, messages=user("Does it stream?"),
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert text_of(chunks) == "Streaming works."
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 21
    assert all(c.usage is None for c in chunks[:-1])
    assert llm.chat_requests[-1].body["messages"][-1] == {"role": "user", "content": "Does it stream?"}


def test_async_client_streaming_and_not(served, llm) -> None:
    llm.script(Reply(text="Async streamed answer."), Reply(text="Cut short", finish_reason="length"))

    async def main():
        client = served.client(openai.AsyncOpenAI)
        stream = await client.chat.completions.create(model=served.name, messages=user("one"), stream=True)
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model=served.name, messages=user("two"),
                                                     extra_body={"inputs": {"tone": "dry"}})
        await client.close()
        return chunks, whole

    chunks, whole = asyncio.run(main())
    assert text_of(chunks) == "Async streamed answer." and all(c.usage is None for c in chunks)
    assert whole.choices[0].message.content == "Cut short" and whole.choices[0].finish_reason == "length"
    assert llm.chat_requests[-1].body["messages"][0]["content"] == "You are the served test flow, tone dry."


def test_chunks_reach_the_client_while_the_model_is_still_stalled(served, llm) -> None:
    llm.script(Reply(text=["First", " words", " never", " finished"], stall_after=2, **STALLED))
    with served.client().chat.completions.create(model=served.name, messages=user("q"), stream=True) as stream:
        got = ""
        for chunk in stream:  # a server that buffered would block here until the client's timeout
            got += text_of([chunk])
            if got == "First words":
                break
        assert llm.disconnects == 0  # the model's stream is still open, stalled before " never"
    # Hanging up ends the stalled upstream stream: it was still running when the client had its text.
    assert llm.wait_for_disconnect(timeout=10)
    assert len(llm.chat_requests) == 1


def test_client_hanging_up_a_stream_closes_the_model_stream(served, llm) -> None:
    llm.script(Reply(text=[f" w{i}" for i in range(100)], chunk_delay=0.2))
    stream = served.client().chat.completions.create(model=served.name, messages=user("q"), stream=True)
    first = next(c for c in stream if text_of([c]))
    stream.response.close()
    assert text_of([first]) == " w0"
    assert llm.wait_for_disconnect(timeout=10), "the model stream ran on after the client left"
    assert len(llm.chat_requests) == 1  # and was not retried


def test_client_timing_out_a_plain_request_closes_the_model_stream(served, llm) -> None:
    llm.script(Reply(text=["Never", " sent"], stall_after=1, **STALLED))
    with pytest.raises(openai.APITimeoutError):
        served.client(timeout=1).chat.completions.create(model=served.name, messages=user("q"))
    assert llm.wait_for_disconnect(timeout=10), "the model stream ran on after the client left"


def test_100_concurrent_streams_each_get_their_own_answer(served, llm) -> None:
    def answer(i: str) -> str:
        return f"Answer {i}:" + "".join(f" {i}-{k}" for k in range(8))

    llm.responder = lambda request: Reply(text=answer(request.body["messages"][-1]["content"].split()[-1]),
                                          chunk_delay=0.01)

    async def ask(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(model=served.name, messages=user(f"question {i}"), stream=True)
        return text_of([chunk async for chunk in stream])

    async def main() -> list[str]:
        async with served.client(openai.AsyncOpenAI, timeout=120) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(100)))

    assert asyncio.run(main()) == [answer(str(i)) for i in range(100)]
    assert len(llm.chat_requests) == 100 and not llm.errors


# --- errors ---------------------------------------------------------------------------------------

BAD = {
    "invalid json": (b'{"messages": [', None, "not valid JSON"),
    "missing messages": ({"model": "served-chat"}, "messages", "messages"),
    "empty messages": ({"messages": []}, "messages", "non-empty"),
    "last from assistant": ({"messages": [*user("hi"), {"role": "assistant", "content": "yes?"}]}, "messages[1]",
                            "last message must be the user's"),
    "n=2": ({"messages": user("hi"), "n": 2}, "n", "n=1"),
    "empty conversation": ({"messages": user("hi"), "conversation_id": " "}, "conversation_id", "non-empty"),
    "image part": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
        "messages[0].content[1]", "image_url"),
    "unknown input": ({"messages": user("hi"), "inputs": {"colour": "red"}}, "inputs", "colour"),
    "mistyped input": ({"messages": user("hi"), "inputs": {"tone": 5}}, "inputs", "tone"),
    "inputs not an object": ({"messages": user("hi"), "inputs": "tone=dry"}, "inputs", "inputs"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_are_400_with_an_openai_error(served, llm, case) -> None:
    body, param, words = BAD[case]
    response = served.post(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    assert llm.chat_requests == []


def test_the_sdk_sees_a_bad_request_error(served, llm) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(model=served.name, messages=user("hi"), n=2)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"


def test_unknown_paths_and_models_are_404_json(served, llm) -> None:
    response = httpx2.get(f"{served.url}/embeddings", timeout=10)
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as caught:
        served.client().models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"


def test_api_key_is_required_and_never_echoed(serve, llm) -> None:
    secret, wrong = "sk-serve-secret-4711", "sk-wrong-guess-0815"
    server = serve(CHAT_FLOW, "--api-key", secret)
    missing = server.post({"messages": user("hi")})
    bad = server.post({"messages": user("hi")}, headers={"authorization": f"Bearer {wrong}"})
    for response in (missing, bad):
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert secret not in response.text and wrong not in response.text
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key=wrong).models.list()
    reply = server.client(api_key=secret).chat.completions.create(model=server.name, messages=user("hi"))
    assert reply.choices[0].message.content == "Hello from the flowrunner test server."
    assert llm.chat_requests[-1].headers["authorization"] == "Bearer sk-test-upstream"  # not the client's key
    server.stop()
    assert secret not in server.stderr and wrong not in server.stderr


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("upstream", "status", "error_class"), [(429, 429, openai.RateLimitError),
                                                                 (503, 502, openai.InternalServerError)])
def test_upstream_failure_before_any_text_is_an_http_error(served, llm, stream, upstream, status, error_class) -> None:
    llm.script(*[Reply(status=upstream, retry_after_ms=1)] * (DEFAULT_MAX_RETRIES + 1))
    with pytest.raises(error_class) as caught:
        served.client().chat.completions.create(model=served.name, messages=user("q"), stream=stream)
    assert caught.value.status_code == status
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and str(upstream) in error["message"]
    if status == 429:
        assert error["code"] == "rate_limit_exceeded"
    assert llm.pending == 0 and len(llm.chat_requests) == DEFAULT_MAX_RETRIES + 1


def test_model_stream_broken_midway_delivers_the_text_then_an_error(served, llm) -> None:
    llm.script(Reply(text=["Partial", " answer", " then", " gone"], disconnect_after=2))
    got: list[str] = []
    stream = served.client().chat.completions.create(model=served.name, messages=user("q"), stream=True)
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            got.append(text_of([chunk]))
    assert "".join(got) == "Partial answer"
    assert caught.value.body and caught.value.body["type"] == "server_error"


def test_model_stream_broken_before_its_first_text_is_an_error_event(served, llm) -> None:
    # The model accepted the request (200), so the response had started: as with OpenAI, the failure
    # comes as an error event, which the SDK raises; no text, no [DONE].
    llm.script(Reply(text=["Never", " sent"], disconnect_after=0))
    got: list[str] = []
    stream = served.client().chat.completions.create(model=served.name, messages=user("q"), stream=True)
    assert stream.response.status_code == 200
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            got.append(text_of([chunk]))
    assert "".join(got) == "" and "broke" in caught.value.message
    assert caught.value.body and caught.value.body["type"] == "server_error"


def test_model_stream_broken_midway_is_not_a_complete_plain_answer(served, llm) -> None:
    llm.script(Reply(text=["Partial", " answer", " then", " gone"], disconnect_after=2))
    with pytest.raises(openai.APIStatusError) as caught:  # never a 200 that claims finish_reason "stop"
        served.client().chat.completions.create(model=served.name, messages=user("q"))
    assert caught.value.status_code == 502 and "broke" in caught.value.message


# --- history --------------------------------------------------------------------------------------

def test_client_messages_are_the_history_without_a_conversation(serve, llm) -> None:
    server = serve(HISTORY_FLOW)
    messages = [{"role": "system", "content": "Be terse."}, *user("q1"), {"role": "assistant", "content": "a1"},
                *user("q2")]
    server.client().chat.completions.create(model=server.name, messages=messages)
    assert llm.chat_requests[-1].body["messages"] == [{"role": "system", "content": "Remember."}, *messages]
    # That turn was not saved: its conversation (the flow's default id), read from the store, is empty.
    server.client().chat.completions.create(model=server.name, messages=user("q3"),
                                            extra_body={"conversation_id": "unnamed"})
    assert llm.chat_requests[-1].body["messages"] == [{"role": "system", "content": "Remember."}, *user("q3")]


def test_a_named_conversation_comes_from_the_store(serve, llm) -> None:
    server = serve(HISTORY_FLOW)
    llm.script(Reply(text="a1"), Reply(text="a2"), Reply(text="a3"))
    client, fake = server.client(), [*user("not from the store"), {"role": "assistant", "content": "nor this"}]
    client.chat.completions.create(model=server.name, messages=user("q1"), extra_body={"conversation_id": "c-7"})
    client.chat.completions.create(model=server.name, messages=[*fake, *user("q2")],
                                   metadata={"conversation_id": "c-7"})
    client.chat.completions.create(model=server.name, messages=[*fake, *user("q3")],
                                   extra_headers={"X-Conversation-Id": "c-7"})
    seen = [r.body["messages"][1:] for r in llm.chat_requests]
    turn = lambda q, a: [*user(q), {"role": "assistant", "content": a}]  # noqa: E731
    assert seen == [user("q1"), [*turn("q1", "a1"), *user("q2")], [*turn("q1", "a1"), *turn("q2", "a2"), *user("q3")]]


# --- the rest of the endpoint -----------------------------------------------------------------------

def test_models_and_healthz(served, llm) -> None:
    assert [m.id for m in served.client().models.list().data] == ["served-chat"]
    assert served.client().models.retrieve("served-chat").owned_by == "flowrunner"
    health = httpx2.get(served.url.removesuffix("/v1") + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_sse_headers_and_keepalive_comments(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--keepalive", "0.2")
    llm.script(Reply(text=["late"], stall_after=0, **STALLED))
    body = {"model": server.name, "messages": user("q"), "stream": True}
    with httpx2.stream("POST", f"{server.url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = next(lines)
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert ": keep-alive" in [next(lines) for _ in range(3)]  # while the model says nothing at all
    assert llm.wait_for_disconnect(timeout=10)


def test_keepalive_comments_while_a_step_works_before_any_stream(serve, llm) -> None:
    # stream: false: no model stream starts, so the response opens after --keepalive with comments,
    # and the whole answer follows as one delta when it comes.
    server = serve(CHAT_FLOW.replace("user_prompt: ${inputs.question}", "user_prompt: ${inputs.question}\n    stream: false"),
                   "--keepalive", "0.2")
    llm.script(Reply(text="slow but whole", stall_after=0, stall=1.0))
    body = {"model": server.name, "messages": user("q"), "stream": True}
    with httpx2.stream("POST", f"{server.url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines.count(": keep-alive") >= 2, lines
    assert lines.index(": keep-alive") < min(i for i, line in enumerate(lines) if "slow but whole" in line)
    assert lines[-1] == "data: [DONE]"


def test_keepalive_comments_when_the_model_goes_quiet_mid_answer(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--keepalive", "0.2")
    llm.script(Reply(text=["Before", " after"], stall_after=1, stall=1.0))
    body = {"model": server.name, "messages": user("q"), "stream": True}
    with httpx2.stream("POST", f"{server.url}/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    texts = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines
             if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert "".join(t for t in texts if t) == "Before after"
    before = next(i for i, line in enumerate(lines) if '"Before"' in line)
    after = next(i for i, line in enumerate(lines) if '" after"' in line)
    assert 2 <= lines[before:after].count(": keep-alive") <= 6, lines  # every 0.2 s of the 1 s pause
    assert lines[-1] == "data: [DONE]"


def test_sigint_stops_the_server_without_a_traceback(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    assert server.client().chat.completions.create(model=server.name, messages=user("hi")).choices
    server.proc.send_signal(signal.SIGINT)
    assert server.wait(timeout=20) in (0, 130), server.stderr
    assert "Traceback" not in server.stderr and "KeyboardInterrupt" not in server.stderr, server.stderr


def test_sigint_with_a_stream_open_stops_without_a_traceback(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["Half", " of", " it"], stall_after=1, **STALLED))
    stream = server.client().chat.completions.create(model=server.name, messages=user("q"), stream=True)
    assert text_of([next(c for c in stream if text_of([c]))]) == "Half"
    server.proc.send_signal(signal.SIGINT)
    try:
        with pytest.raises(openai.APIError, match="shutting down"):  # told, not cut off
            list(stream)
        assert server.wait(timeout=30) in (0, 130), server.stderr
    finally:
        stream.close()
    assert llm.wait_for_disconnect(timeout=10)
    assert "Traceback" not in server.stderr, server.stderr
