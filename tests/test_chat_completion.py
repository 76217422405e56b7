"""The chat_completion step through the real CLI against the local OpenAI-protocol server:
streaming, Azure, and every failure with its exit code, message and partial text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import RECORDINGS, Reply
from tests.support.jsonlines import json_lines

FLOW = """
version: 1
name: chat
inputs:
  question: {{type: string}}
connections:
  llm:
    type: openai
    api_key: ${{env.TEST_OPENAI_KEY}}
    base_url: ${{env.TEST_OPENAI_BASE_URL}}
    {conn_extra}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    system_prompt: Be brief.
    user_prompt: ${{inputs.question}}
    {step_extra}
  - id: keep
    type: set
    run_on_failure: true
    values: {{kept: "${{response}}", partial: "${{steps.answer.partial}}"}}
outputs:
  answer: ${{response}}
"""


@pytest.fixture
def chat(llm, write_flow):
    """Run the chat flow against the test server: chat(conn_extra=..., step_extra=..., args=...)."""

    def run(*args: str, conn_extra: str = "", step_extra: str = "", question: str = "hi", env: dict | None = None):
        flow = write_flow(FLOW.format(conn_extra=conn_extra, step_extra=step_extra))
        full_env = {"TEST_OPENAI_KEY": "sk-test", "TEST_OPENAI_BASE_URL": llm.base_url, **(env or {})}
        return run_cli("run", str(flow), "-i", f"question={question}", *args, env=full_env)

    return run


def spawn(flow: Path, llm) -> subprocess.Popen:
    """The CLI as a live process, so a test can read its stdout while the stream is still going."""
    env = {**os.environ, "TEST_OPENAI_KEY": "k", "TEST_OPENAI_BASE_URL": llm.base_url}
    return subprocess.Popen([sys.executable, "-m", "flowrunner", "run", str(flow), "-i", "question=q"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def events(out: subprocess.CompletedProcess) -> list[dict]:
    return json_lines(out.stdout)


def finished(out: subprocess.CompletedProcess, step: str) -> dict:
    return next(e for e in events(out) if e["event"] == "step_finished" and e["step"] == step)


def test_streams_text_and_sends_the_seed_request(chat, llm) -> None:
    llm.script(Reply(text=["Hello", " from", " the", " model."], usage={"prompt_tokens": 9, "completion_tokens": 4,
                                                                       "total_tokens": 13}))
    out = chat("--sink", "jsonl:-", step_extra="temperature: 0.3\n    max_completion_tokens: 50")
    assert out.returncode == 0, out.stderr
    deltas = [e["text"] for e in events(out) if e["event"] == "text"]
    assert deltas == ["Hello", " from", " the", " model."]
    answer = finished(out, "answer")["outputs"]
    assert answer["text"] == "Hello from the model." and answer["finish_reason"] == "stop"
    assert answer["usage"]["total_tokens"] == 13 and answer["partial"] is False
    body = llm.chat_requests[-1].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert body["temperature"] == 0.3 and body["max_completion_tokens"] == 50 and body["model"] == "gpt-4o-mini"
    assert llm.chat_requests[-1].headers["authorization"] == "Bearer sk-test"


def test_temperature_defaults_to_0_7(chat, llm) -> None:
    assert chat().returncode == 0
    assert llm.chat_requests[-1].json["temperature"] == 0.7


def test_example_chat_flow_streams_to_stdout_before_the_stream_ends(llm) -> None:
    llm.script(Reply(text=["First", " words", " arrive", " early", " and", " often."], chunk_delay=0.4))
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "run", "flows/chat.yaml", "-i", "question=Hi?"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(5)  # type: ignore[union-attr]
        assert first == b"First"
        assert proc.poll() is None, "the run had already ended: the text was not streamed"
        rest = proc.stdout.read().decode()  # type: ignore[union-attr]
        assert rest == " words arrive early and often.\n"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert llm.chat_requests[-1].json["messages"][-1] == {"role": "user", "content": "Hi?"}


def test_same_flow_on_azure_openai_hits_the_deployment_path(llm, tmp_path: Path) -> None:
    (tmp_path / "azure.yaml").write_text("""
connections:
  llm:
    type: azure_openai
    endpoint: ${env.AZ_ENDPOINT}
    api_key: ${env.AZ_KEY}
    api_version: 2024-10-21
    deployment: my-gpt4o
""")
    out = run_cli("run", "flows/chat.yaml", "-i", "question=hello azure", "--connections", str(tmp_path / "azure.yaml"),
                  env={"AZ_ENDPOINT": llm.azure_endpoint, "AZ_KEY": "az-key-1234"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello from the flowrunner test server.\n"
    req = llm.chat_requests[-1]
    assert req.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert req.query["api-version"] == "2024-10-21" and req.headers["api-key"] == "az-key-1234"
    assert "authorization" not in req.headers


def test_azure_step_level_deployment(llm, write_flow) -> None:
    flow = write_flow("""
version: 1
name: azure-chat
connections:
  llm: {type: azure_openai, endpoint: "${env.AZ_ENDPOINT}", api_key: "${env.AZ_KEY}"}
steps:
  - {id: answer, type: chat_completion, connection: llm, deployment: step-deploy, user_prompt: hi}
""")
    out = run_cli("run", str(flow), env={"AZ_ENDPOINT": llm.azure_endpoint, "AZ_KEY": "az-key-1234"})
    assert out.returncode == 0, out.stderr
    assert llm.chat_requests[-1].path == "/openai/deployments/step-deploy/chat/completions"


def test_refusal_is_an_output(chat, llm) -> None:
    llm.script(Reply(refusal="I can't help with that."))
    out = chat("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    assert finished(out, "answer")["outputs"]["refusal"] == "I can't help with that."


def test_missing_key_is_an_error_before_any_request(llm, write_flow) -> None:
    flow = write_flow(FLOW.format(conn_extra="", step_extra=""))
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_OPENAI_KEY", "TEST_OPENAI_BASE_URL", "OPENAI_API_KEY")}
    out = subprocess.run([sys.executable, "-m", "flowrunner", "run", str(flow), "-i", "question=q"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "flow.yaml:9:14: connections.llm.api_key: connection 'llm' needs an API key: environment variable TEST_OPENAI_KEY is not set" in out.stderr
    assert llm.requests == []


def test_429_is_retried_honouring_retry_after(chat, llm) -> None:
    llm.script(Reply(status=429, retry_after=1), Reply(text="after the wait"))
    out = chat()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "after the wait\n"
    first, second = llm.chat_requests
    assert second.received_at - first.received_at >= 0.9  # Retry-After: 1 was honoured (a lower bound)
    assert second.headers["x-stainless-retry-count"] == "1"


def test_429_after_all_retries_is_a_clear_error(chat, llm) -> None:
    llm.script(*[Reply(status=429, retry_after_ms=5)] * 3)
    out = chat(conn_extra="max_retries: 2")
    assert out.returncode == 1
    assert "step 'answer' (chat_completion) failed: rate limited (429) after 2 retries" in out.stderr
    assert len(llm.chat_requests) == 3 and "Traceback" not in out.stderr


def test_5xx_then_success(chat, llm) -> None:
    llm.script(Reply(status=503, retry_after_ms=5), Reply(text="recovered"))
    out = chat()
    assert out.returncode == 0 and out.stdout == "recovered\n"


@pytest.mark.parametrize("status, message", [(401, "authentication failed (401)"), (404, "not found (404)"),
                                             (400, "the request was rejected (400)")])
def test_client_errors_are_not_retried(chat, llm, status: int, message: str) -> None:
    llm.script(Reply(status=status))
    out = chat()
    assert out.returncode == 1 and message in out.stderr
    assert len(llm.chat_requests) == 1


def test_disconnect_after_first_delta_keeps_partial_text(chat, llm) -> None:
    llm.script(Reply(text=["Partial", " answer", " that", " never", " ends"], disconnect_after=2))
    out = chat(step_extra="retry: {attempts: 3, backoff: 0}")
    assert out.returncode == 1
    assert out.stdout == "Partial answer\n"
    assert "failed: the connection broke mid-stream" in out.stderr
    assert len(llm.chat_requests) == 1, "a stream that already produced text must not be retried"
    llm.script(Reply(text=["Partial", " answer", " that", " never", " ends"], disconnect_after=2))
    jsonl = chat("--sink", "jsonl:-")
    answer = finished(jsonl, "answer")
    assert answer["status"] == "failed" and answer["outputs"]["text"] == "Partial answer"
    assert answer["outputs"]["partial"] is True
    assert finished(jsonl, "keep")["outputs"] == {"kept": "Partial answer", "partial": True}


def test_broken_stream_before_first_delta_is_retried(chat, llm) -> None:
    llm.script(Reply(text="never seen", disconnect_after=0), Reply(text="second try"))
    out = chat(step_extra="retry: {attempts: 2, backoff: 0}")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "second try\n" and len(llm.chat_requests) == 2


def test_stream_without_finish_or_done_is_an_error(chat, llm) -> None:
    llm.script(Reply(text=["cut", " short"], no_done=True, no_finish=True, usage=False))
    out = chat()
    assert out.returncode == 1
    assert out.stdout == "cut short\n"
    assert "the stream ended before the model finished (no finish_reason)" in out.stderr


def test_stream_without_done_but_finished_is_a_warning(chat, llm) -> None:
    llm.script(Reply(text="complete", no_done=True))
    out = chat("--sink", "jsonl:-")
    assert out.returncode == 0
    assert any(e["event"] == "warning" and "without [DONE]" in e["message"] for e in events(out))


def test_malformed_chunk(chat, llm) -> None:
    llm.script(Reply(text=["good", " then"], malformed_after=1))
    out = chat()
    assert out.returncode == 1 and out.stdout == "good\n"
    assert "the server sent a malformed chunk" in out.stderr


def test_error_event_inside_the_stream(chat, llm) -> None:
    llm.script(Reply(text=["some", " text"], error_after=1))
    out = chat()
    assert out.returncode == 1 and out.stdout == "some\n"
    assert "the server reported an error mid-stream: The server had an error" in out.stderr


def test_200_that_is_not_an_event_stream(chat, llm) -> None:
    llm.script(Reply(text="json instead", not_sse=True))
    out = chat()
    assert out.returncode == 1
    assert "not an event stream" in out.stderr and "application/json" in out.stderr


def test_stall_longer_than_the_idle_timeout(chat, llm) -> None:
    llm.script(Reply(text=["before", " after"], stall_after=1, stall=5))
    out = chat(conn_extra="timeout: 0.5")
    assert out.returncode == 1 and out.stdout == "before\n"
    assert "the stream stalled: no data for 0.5 s" in out.stderr


def test_content_filter_is_an_error_and_length_a_warning(chat, llm) -> None:
    llm.script(Reply(text="bad words", content_filter=True))
    out = chat()
    assert out.returncode == 1 and "stopped by the content filter" in out.stderr
    llm.script(Reply(text="cut off", finish_reason="length"))
    out = chat("--sink", "jsonl:-")
    assert out.returncode == 0
    assert any(e["event"] == "warning" and "finish_reason: length" in e["message"] for e in events(out))


def test_recorded_tool_call_streams_accumulate(chat, llm) -> None:
    llm.script(Reply.from_recording("c6aa7e397b71"))
    out = chat("--sink", "jsonl:-", step_extra="tools: [{type: function, function: {name: GetWeatherArgs}}]")
    assert out.returncode == 0, out.stderr
    calls = finished(out, "answer")["outputs"]["tool_calls"]
    assert [c["name"] for c in calls] == ["GetWeatherArgs"]
    assert calls[0]["arguments"] == {"city": "Edinburgh", "country": "UK", "units": "c"}
    assert calls[0]["id"].startswith("call_")


def test_recorded_parallel_tool_calls(chat, llm) -> None:
    llm.script(Reply.from_recording("f82268f2fefd"))
    out = chat("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    calls = finished(out, "answer")["outputs"]["tool_calls"]
    assert len(calls) == 2 and calls[0]["id"] != calls[1]["id"]
    assert all(isinstance(c["arguments"], dict) and c["arguments"] for c in calls)


def test_recorded_text_stream(chat, llm) -> None:
    recording = (RECORDINGS / "e2aad469b71d.sse").read_text()
    expected = "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in recording.splitlines() if line.startswith("data: {"))
    llm.script(Reply.from_recording("e2aad469b71d"))
    out = chat("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    assert finished(out, "answer")["outputs"]["text"] == expected and expected


def test_malformed_tool_arguments_are_an_error(chat, llm) -> None:
    llm.script(Reply(tool_calls=[{"name": "lookup", "arguments": '{"city": "Par'}]))
    out = chat()
    assert out.returncode == 1 and "tool call 'lookup' has malformed JSON arguments" in out.stderr


def test_stream_false(chat, llm) -> None:
    llm.script(Reply(text="all at once"))
    out = chat(step_extra="stream: false")
    assert out.returncode == 0 and out.stdout == "all at once\n"
    assert llm.chat_requests[-1].json["stream"] is False


def test_ctrl_c_closes_the_http_stream(llm, write_flow, tmp_path: Path) -> None:
    llm.script(Reply(text=["slow"] * 40, chunk_delay=0.25))
    proc = spawn(write_flow(FLOW.format(conn_extra="", step_extra="")), llm)
    try:
        assert proc.stdout.read(4) == b"slow"  # type: ignore[union-attr]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        assert llm.wait_for_disconnect(timeout=5), "the server never saw the stream closed"
        assert b"Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()


def test_one_connection_is_reused_across_streams(llm, write_flow) -> None:
    """After [DONE] the body is drained, so the next request reuses the kept-alive connection."""
    flow = write_flow("""
version: 1
name: two-turns
connections:
  llm: {type: openai, api_key: k, base_url: "${env.TEST_OPENAI_BASE_URL}"}
steps:
  - {id: one, type: chat_completion, connection: llm, model: m, user_prompt: first, result: a}
  - {id: two, type: chat_completion, connection: llm, model: m, user_prompt: "${a}", result: b}
""")
    out = run_cli("run", str(flow), env={"TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 0, out.stderr
    first, second = llm.chat_requests
    assert second.json["messages"][-1]["content"] == "Hello from the flowrunner test server."
    assert first.connection == second.connection


# --- regressions found in review -------------------------------------------------------------

def test_step_timeout_mid_stream_keeps_the_partial_answer(chat, llm) -> None:
    llm.script(Reply(text=["one"] + [" more"] * 60, chunk_delay=0.25))  # 15 s: far longer than the timeout
    out = chat("--sink", "jsonl:-", step_extra="timeout: 4")
    assert out.returncode == 1
    answer = finished(out, "answer")
    streamed = "".join(e["text"] for e in events(out) if e["event"] == "text")
    assert answer["status"] == "failed" and "timed out after 4 s" in answer["error"]
    assert answer["outputs"]["partial"] is True and answer["outputs"]["text"] == streamed
    assert streamed.startswith("one") and len(streamed) < len("one" + " more" * 60)
    assert finished(out, "keep")["outputs"]["kept"] == answer["outputs"]["text"]


def test_closed_pipe_exits_quietly_and_closes_the_stream(llm, write_flow) -> None:
    llm.script(Reply(text=["word"] * 200, chunk_delay=0.01))
    flow = write_flow(FLOW.format(conn_extra="", step_extra=""))
    env = {**os.environ, "TEST_OPENAI_KEY": "k", "TEST_OPENAI_BASE_URL": llm.base_url}
    cmd = f"{sys.executable} -m flowrunner run {flow} -i question=q | head -c 8"
    out = subprocess.run(["bash", "-c", cmd + "; echo \" rc=${PIPESTATUS[0]}\""], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "wordword rc=141\n"
    assert "Traceback" not in out.stderr and "Error" not in out.stderr
    assert llm.wait_for_disconnect(timeout=5)


@pytest.mark.parametrize("chunk", [
    '{"choices":[{"index":0,"delta":{"content":["a","list"]}}]}',
    '{"choices":{"index":0}}',
    '{"choices":[{"index":0,"delta":"text"}]}',
    '{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":"f"}]}}]}',
])
def test_valid_json_of_the_wrong_shape_is_a_clear_error(chat, llm, tmp_path: Path, chunk: str) -> None:
    sse = tmp_path / "odd.sse"
    sse.write_text('data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"ok"}}]}\n\n'
                   f"data: {chunk}\n\ndata: [DONE]\n\n")
    llm.script(Reply(replay=str(sse)))
    out = chat()
    assert out.returncode == 1
    assert "the server sent a chunk of an unexpected shape" in out.stderr
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr


def test_cut_after_finish_reason_is_only_a_warning(chat, llm) -> None:
    llm.script(Reply(text="a b", disconnect_after=3))  # two deltas and the finish chunk, then the cut
    out = chat("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    assert finished(out, "answer")["outputs"]["text"] == "a b"
    assert any(e["event"] == "warning" and "without [DONE]" in e["message"] for e in events(out))


def test_values_from_references_are_checked_at_run_time(llm, write_flow) -> None:
    flow = write_flow("""
version: 1
name: typed
inputs:
  stream: {type: string, default: "false"}
connections:
  llm: {type: openai, api_key: k, base_url: "${env.TEST_OPENAI_BASE_URL}"}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: q, stream: "${inputs.stream}"}
""")
    out = run_cli("run", str(flow), env={"TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 1
    assert "stream: expected true or false, got a string 'false'" in out.stderr
    assert llm.chat_requests == []


def test_connection_errors_point_at_the_connections_file(llm, tmp_path: Path) -> None:
    (tmp_path / "conns.yaml").write_text("connections:\n  llm:\n    type: azure_openai\n"
                                         "    endpoint: ${env.AZ_ENDPOINT}\n    api_key: ${env.AZ_KEY_UNSET}\n"
                                         "    deployment: d\n")
    env = {k: v for k, v in os.environ.items() if k != "AZ_KEY_UNSET"}
    env["AZ_ENDPOINT"] = llm.azure_endpoint
    out = subprocess.run([sys.executable, "-m", "flowrunner", "run", "flows/chat.yaml", "-i", "question=q",
                          "--connections", str(tmp_path / "conns.yaml")], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert f"{tmp_path / 'conns.yaml'}:3:5: connections.llm: connection 'llm' needs api_key or azure_ad_token: " \
           "environment variable AZ_KEY_UNSET is not set" in out.stderr


def test_a_missing_variable_inside_a_url_is_an_error_not_a_fallback(llm, write_flow) -> None:
    flow = write_flow("""
version: 1
name: host
connections:
  llm: {type: openai, api_key: k, base_url: "http://${env.LLM_HOST_UNSET}/v1"}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: q}
""")
    env = {k: v for k, v in os.environ.items() if k != "LLM_HOST_UNSET"}
    out = subprocess.run([sys.executable, "-m", "flowrunner", "run", str(flow)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "flow.yaml:5:53: connections.llm.base_url: environment variable LLM_HOST_UNSET is not set" in out.stderr


def test_credentials_in_a_base_url_are_never_printed(write_flow) -> None:
    flow = write_flow("""
version: 1
name: creds
connections:
  llm: {type: openai, api_key: k, base_url: "${env.CRED_URL}", max_retries: 0}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: q}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env={"CRED_URL": "http://user:hunter2secret@127.0.0.1:9/v1"})
    assert out.returncode == 1 and "cannot reach http://127.0.0.1:9/v1" in out.stderr
    assert "hunter2secret" not in out.stdout + out.stderr


# The streaming request is sent by flowrunner/llm/chat_request.py, not by the SDK's create(): it must
# send what the SDK sends (the non-streaming request still goes through the SDK) and retry as it does.

def _same_headers(fast: dict, sdk: dict) -> None:
    skip = {"content-length"}
    assert {k: v for k, v in fast.items() if k not in skip} == {k: v for k, v in sdk.items() if k not in skip}


def test_the_streaming_request_carries_the_sdks_headers(chat, llm) -> None:
    conn = "organization: org-123\n    project: proj-9"
    assert chat(conn_extra=conn).returncode == 0
    assert chat(conn_extra=conn, step_extra="stream: false").returncode == 0
    fast, sdk = llm.chat_requests
    assert fast.json["stream"] is True and sdk.json["stream"] is False
    assert fast.headers["authorization"] == "Bearer sk-test" and fast.headers["openai-organization"] == "org-123"
    assert fast.headers["openai-project"] == "proj-9" and fast.headers["user-agent"].startswith("AsyncOpenAI/Python")
    _same_headers(fast.headers, sdk.headers)
    assert fast.headers["x-stainless-retry-count"] == "0"


def test_azure_with_an_entra_token_sends_it_as_bearer(llm, write_flow) -> None:
    flow = write_flow("""
version: 1
name: azure-token
connections:
  llm: {type: azure_openai, endpoint: "${env.AZ_ENDPOINT}", azure_ad_token: "${env.AZ_TOKEN}", deployment: d 1}
steps:
  - {id: answer, type: chat_completion, connection: llm, user_prompt: hi, stream: "${inputs.stream}"}
inputs:
  stream: {type: boolean}
""")
    env = {"AZ_ENDPOINT": llm.azure_endpoint, "AZ_TOKEN": "entra-token-1"}
    assert run_cli("run", str(flow), "-i", "stream=true", env=env).returncode == 0
    assert run_cli("run", str(flow), "-i", "stream=false", env=env).returncode == 0
    fast, sdk = llm.chat_requests
    assert fast.path == sdk.path == "/openai/deployments/d 1/chat/completions"  # sent as d%201
    assert fast.query == sdk.query and fast.headers["authorization"] == "Bearer entra-token-1"
    assert "api-key" not in fast.headers
    _same_headers(fast.headers, sdk.headers)


@pytest.mark.parametrize("reply, retried", [
    (Reply(status=503, headers={"x-should-retry": "false"}), False),  # the server says: do not
    (Reply(status=400, headers={"x-should-retry": "true"}), True),  # the server says: do
    (Reply(status=429, retry_after=600), False),  # a wait longer than 2 minutes is not waited for
    (Reply(status=409, retry_after_ms=5), True),
    (Reply(status=408, retry_after="0.01"), True),
])
def test_the_sdks_retry_rules(chat, llm, reply: Reply, retried: bool) -> None:
    llm.script(reply, Reply(text="second try"))
    out = chat(conn_extra="max_retries: 1")
    assert len(llm.chat_requests) == (2 if retried else 1)
    assert out.returncode == (0 if retried else 1), out.stderr
    assert "Traceback" not in out.stderr and " after " not in out.stderr  # no "after 1 retries": none was made


def test_an_unreachable_server_is_retried_then_a_clear_error(chat, llm) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    out = chat(conn_extra="max_retries: 2", env={"TEST_OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    assert out.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1/: ConnectError" in out.stderr and "hint:" in out.stderr
    assert time.monotonic() - start >= 0.5 * 0.75 + 1.0 * 0.75  # two backoffs: 0.5 s and 1 s, less jitter


def test_azure_does_not_follow_a_redirect_with_its_key(llm, write_flow) -> None:
    # httpx2 drops Authorization on a redirect to another host, but not Azure's api-key header.
    elsewhere = llm.azure_endpoint.replace("127.0.0.1", "localhost") + "/collect"
    llm.script(Reply(status=307, headers={"location": elsewhere}))
    flow = write_flow("""
version: 1
name: azure-redirect
connections:
  llm: {type: azure_openai, endpoint: "${env.AZ_ENDPOINT}", api_key: "${env.AZ_KEY}", deployment: d}
steps:
  - {id: answer, type: chat_completion, connection: llm, user_prompt: hi}
""")
    out = run_cli("run", str(flow), env={"AZ_ENDPOINT": llm.azure_endpoint, "AZ_KEY": "az-secret-77"})
    assert out.returncode == 1 and "the request was rejected (307)" in out.stderr
    assert len(llm.requests) == 1 and "az-secret-77" not in out.stderr


@pytest.mark.parametrize("body, said", [
    ({"error": {"message": "The model does not exist"}}, "The model does not exist"),
    ({"error": "model 'llama9' not found"}, "model 'llama9' not found"),  # Ollama's shape
    ("upstream connect error or disconnect/reset before headers\nmore", "upstream connect error or disconnect"),
    ("<html><body><h1>502 Bad Gateway</h1></body></html>", "Error code: 502"),  # a proxy's page: not pasted
    (None, "Error code: 502"),
])
def test_what_the_server_said_in_a_refusal(body, said: str) -> None:
    from flowrunner.llm.errors import status_error

    class LLM:
        max_retries, kind, keyless = 2, "openai", False

    err = status_error(502, body, LLM(), retried=1)
    assert err.message.startswith("server error (502) after 1 retry: ") and said in err.message
    assert "<html>" not in err.message and "\nmore" not in err.message
