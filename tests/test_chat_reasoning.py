"""Reasoning models (issue 12): `reasoning_effort`, `system_role: developer`, `temperature: null`, and
the thinking that OpenAI-compatible servers stream as `delta.reasoning_content` (DeepSeek, vLLM,
llama.cpp, LM Studio) or `delta.reasoning` (Ollama, OpenRouter): the `reasoning` output and events,
never in the answer; `--show-reasoning`; the jsonl sink; replays; `serve` passing it on as
`delta.reasoning_content`, read by the openai SDK; usage details kept everywhere."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import Reply
from tests.support.jsonlines import events, read_json_lines
from tests.test_serve import Server

FLOW = """
version: 1
name: think
inputs:
  question: {{type: string}}
connections:
  llm: {{type: openai, api_key: "${{env.OPENAI_API_KEY}}", base_url: "${{env.OPENAI_BASE_URL}}"}}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: deepseek-reasoner
    system_prompt: Be brief.
    user_prompt: ${{inputs.question}}
    {extra}
outputs:
  answer: ${{response}}
"""
SPELLINGS = ["reasoning_content", "reasoning"]  # DeepSeek, vLLM, llama.cpp, LM Studio | Ollama, OpenRouter
THINKING = ["Two", " plus", " two", " is", " four."]
ANSWER = ["The", " answer", " is", " 4."]
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
         "completion_tokens_details": {"reasoning_tokens": 8, "accepted_prediction_tokens": 0},
         "prompt_tokens_details": {"cached_tokens": 6}}


@pytest.fixture
def think(llm, write_flow):
    """think(*args, extra=..., question=...): runs FLOW against the test server."""

    def run(*args: str, extra: str = "", question: str = "2+2?", env: dict | None = None, flow_text: str = FLOW):
        flow = write_flow(flow_text.format(extra=extra))
        full = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url, **(env or {})}
        return run_cli("run", str(flow), "-i", f"question={question}", *args, env=full)

    return run


def finished(out: subprocess.CompletedProcess, step: str = "answer") -> dict:
    return next(e for e in events(out.stdout) if e["event"] == "step_finished" and e["step"] == step)


# --- the stream: both spellings ------------------------------------------------------------------

@pytest.mark.parametrize("field", SPELLINGS)
def test_reasoning_becomes_events_and_an_output_never_the_answer(think, llm, field: str) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING, reasoning_field=field, usage=USAGE))
    out = think("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    evs = events(out.stdout)
    assert [e["text"] for e in evs if e["event"] == "reasoning"] == THINKING
    assert all(e["step"] == "answer" for e in evs if e["event"] == "reasoning")
    assert [e["text"] for e in evs if e["event"] == "text"] == ANSWER
    kinds = [e["event"] for e in evs if e["event"] in ("reasoning", "text")]
    assert kinds == ["reasoning"] * 5 + ["text"] * 4  # the thinking first, as it streamed
    outputs = finished(out)["outputs"]
    assert outputs["text"] == "The answer is 4." and outputs["reasoning"] == "Two plus two is four."
    assert outputs["usage"] == USAGE  # reasoning_tokens and cached_tokens as the server sent them
    usage = next(e for e in evs if e["event"] == "usage")["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 8
    assert usage["prompt_tokens_details"]["cached_tokens"] == 6


@pytest.mark.parametrize("field", SPELLINGS)
def test_stdout_holds_the_answer_alone_and_stderr_nothing_without_the_flag(think, llm, field: str) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING, reasoning_field=field))
    out = think()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The answer is 4.\n"
    assert "four" not in out.stderr


def test_show_reasoning_writes_it_to_stderr_plain_when_not_a_terminal(think, llm) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING))
    out = think("--show-reasoning")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The answer is 4.\n"  # unchanged
    assert "Two plus two is four.\n" in out.stderr.splitlines(keepends=True)  # its own line, ended
    assert "\x1b[" not in out.stderr  # a file or a pipe gets plain text


def test_show_reasoning_leaves_the_events_to_the_jsonl_sink(think, llm, tmp_path: Path) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING))
    sink = tmp_path / "events.jsonl"
    out = think("--show-reasoning", "--sink", f"jsonl:{sink}")
    assert out.returncode == 0, out.stderr
    assert [e["text"] for e in read_json_lines(sink) if e["event"] == "reasoning"] == THINKING
    assert "Two plus two is four.\n" in out.stderr.splitlines(keepends=True)
    assert out.stdout == "The answer is 4.\n"  # the flow's output, printed at the end: the answer alone


def test_show_reasoning_is_dimmed_on_a_terminal(llm, write_flow) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING))
    flow = write_flow(FLOW.format(extra=""))
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    env.pop("NO_COLOR", None)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "flowrunner", "run", str(flow), "-i", "question=2+2?",
                               "--show-reasoning", "-q"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=slave, timeout=60)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                piece = os.read(master, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not piece:
                break
            seen += piece
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert proc.stdout == b"The answer is 4.\n"
    terminal = seen.decode()
    assert "\x1b[2mTwo\x1b[0m\x1b[2m plus\x1b[0m" in terminal  # faint, piece by piece, as it arrives
    assert terminal.replace("\x1b[2m", "").replace("\x1b[0m", "").strip() == "Two plus two is four."


def test_a_stream_without_reasoning_has_a_null_reasoning_output(think, llm) -> None:
    llm.script(Reply(text=ANSWER))
    out = think("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    assert finished(out)["outputs"]["reasoning"] is None
    assert not [e for e in events(out.stdout) if e["event"] == "reasoning"]


def test_a_delta_with_both_reasoning_and_content_keeps_both_in_order(think, llm, tmp_path: Path) -> None:
    # vLLM: the delta where the thinking ends may carry its last piece and the answer's first.
    head = '"id":"c1","object":"chat.completion.chunk","created":1,"model":"qwen3"'
    deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "Think"},
              {"reasoning_content": " done.", "content": "Answer"}, {"content": " here."}]
    lines = [f'data: {{{head},"choices":[{{"index":0,"delta":{json.dumps(d)},"finish_reason":null}}]}}' for d in deltas]
    lines.append(f'data: {{{head},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}')
    recording = tmp_path / "vllm.sse"
    recording.write_text("\n\n".join([*lines, "data: [DONE]"]) + "\n\n")
    llm.script(Reply.from_recording(recording))
    out = think("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    pieces = [(e["event"], e["text"]) for e in events(out.stdout) if e["event"] in ("reasoning", "text")]
    assert pieces == [("reasoning", "Think"), ("reasoning", " done."), ("text", "Answer"), ("text", " here.")]
    assert finished(out)["outputs"]["text"] == "Answer here."
    assert finished(out)["outputs"]["reasoning"] == "Think done."


def test_reasoning_that_is_not_text_is_a_clear_error(think, llm, tmp_path: Path) -> None:
    head = '"id":"c1","object":"chat.completion.chunk","created":1,"model":"m"'
    recording = tmp_path / "bad.sse"
    recording.write_text(f'data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}}}}]}}\n\n'
                         f'data: {{{head},"choices":[{{"index":0,"delta":{{"reasoning_content":{{"x":1}}}}}}]}}\n\n')
    llm.script(Reply.from_recording(recording))
    out = think()
    assert out.returncode == 1
    assert "unexpected shape" in out.stderr and "step 'answer'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("field", SPELLINGS)
def test_a_plain_reply_carries_its_reasoning_too(think, llm, field: str) -> None:
    llm.script(Reply(text="Four.", reasoning="Simple sum.", reasoning_field=field, usage=USAGE))
    out = think("--sink", "jsonl:-", extra="stream: false")
    assert out.returncode == 0, out.stderr
    evs = events(out.stdout)
    assert [(e["event"], e["text"]) for e in evs if e["event"] in ("reasoning", "text")] == [
        ("reasoning", "Simple sum."), ("text", "Four.")]
    outputs = finished(out)["outputs"]
    assert outputs["reasoning"] == "Simple sum." and outputs["text"] == "Four."
    assert outputs["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8
    assert outputs["usage"]["prompt_tokens_details"]["cached_tokens"] == 6


# --- the request -----------------------------------------------------------------------------------

REASONING_STEP = "reasoning_effort: high\n    system_role: developer\n    temperature: null"


def test_the_request_for_a_reasoning_model(think, llm) -> None:
    assert think(extra=REASONING_STEP).returncode == 0
    body = llm.chat_requests[-1].json
    assert body["reasoning_effort"] == "high" and "temperature" not in body
    assert body["messages"] == [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def test_without_the_new_properties_the_request_is_as_before(think, llm) -> None:
    assert think().returncode == 0
    body = llm.chat_requests[-1].json
    assert body["temperature"] == 0.7 and "reasoning_effort" not in body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}


def test_the_streaming_body_is_what_the_sdk_sends(think, llm) -> None:
    """The streaming request is built by flowrunner, the plain one by the SDK's create(): the same fields."""
    assert think(extra=REASONING_STEP).returncode == 0
    assert think(extra=REASONING_STEP + "\n    stream: false").returncode == 0
    fast, sdk = (r.json for r in llm.chat_requests[-2:])
    assert sdk["stream"] is False and fast["stream"] is True
    drop = {"stream", "stream_options"}
    assert {k: v for k, v in fast.items() if k not in drop} == {k: v for k, v in sdk.items() if k not in drop}
    # ...and what the SDK sends when a program asks for the same thing itself
    client = openai.OpenAI(base_url=llm.base_url, api_key="sk-test", max_retries=0)
    client.chat.completions.create(model="deepseek-reasoner", reasoning_effort="high",
                                   messages=[{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": "2+2?"}])
    direct = llm.chat_requests[-1].json
    assert {k: v for k, v in direct.items() if k not in drop} == {k: v for k, v in sdk.items() if k not in drop}


def test_a_history_keeps_its_own_system_messages_with_the_developer_role(think, llm) -> None:
    extra = ('system_role: developer\n    history: [{role: system, content: "Old rule."}, '
             '{role: user, content: "hi"}, {role: assistant, content: "hello"}]')
    assert think(extra=extra).returncode == 0
    roles = [m["role"] for m in llm.chat_requests[-1].json["messages"]]
    assert roles == ["developer", "system", "user", "assistant", "user"]


def test_effort_from_an_input_is_checked_at_run_time(llm, write_flow) -> None:
    flow = write_flow(FLOW.replace("question: {{type: string}}", "question: {{type: string}}\n  effort: {{type: string}}")
                      .format(extra="reasoning_effort: ${inputs.effort}"))
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    ok = run_cli("run", str(flow), "-i", "question=q", "-i", "effort=low", env=env)
    assert ok.returncode == 0, ok.stderr
    assert llm.chat_requests[-1].json["reasoning_effort"] == "low"
    sent = len(llm.chat_requests)
    bad = run_cli("run", str(flow), "-i", "question=q", "-i", "effort=extreme", env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "step 'answer'" in bad.stderr
    assert "reasoning_effort: 'extreme' is not one of: minimal, low, medium, high" in bad.stderr
    assert len(llm.chat_requests) == sent  # refused before any request


@pytest.mark.parametrize("line, message", [
    ("reasoning_effort: extreme", "reasoning_effort"),
    ("system_role: assistant", "system_role"),
    ("temperature: hot", "temperature"),
])
def test_validate_locates_a_bad_value(write_flow, line: str, message: str) -> None:
    flow = write_flow(FLOW.format(extra=line))
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    lines = FLOW.format(extra=line).splitlines()
    row = next(i for i, text in enumerate(lines, 1) if text.strip() == line)
    col = lines[row - 1].index(line.split(":")[1].strip()) + 1
    assert f"{flow}:{row}:{col}:" in out.stdout + out.stderr
    assert message in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_steps_lists_the_properties_and_the_output() -> None:
    out = run_cli("steps", "chat_completion")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert any(x.startswith("  reasoning_effort: minimal | low | medium | high | ${ref} (optional)") for x in lines)
    assert any(x.startswith("  system_role: system | developer | ${ref} (optional, default 'system')") for x in lines)
    assert any(x.startswith("  temperature: number or null | ${ref} (optional, default 0.7)") for x in lines)
    outputs = lines[lines.index("outputs (${steps.ID.NAME}):"):]
    assert any(x.startswith("  reasoning: a reasoning model's thinking") for x in outputs)


# --- record and replay -----------------------------------------------------------------------------

@pytest.mark.parametrize("field", SPELLINGS)
def test_a_recorded_reasoning_stream_replays_with_its_reasoning(think, llm, tmp_path: Path, field: str) -> None:
    tape = tmp_path / "tape.jsonl"
    llm.script(Reply(text=ANSWER, reasoning=THINKING, reasoning_field=field))
    assert think("--record", str(tape), extra="reasoning_effort: low").returncode == 0
    sent = len(llm.chat_requests)
    out = think("--replay", str(tape), "--sink", "jsonl:-", extra="reasoning_effort: low")
    assert out.returncode == 0, out.stderr
    assert len(llm.chat_requests) == sent  # offline
    assert [e["text"] for e in events(out.stdout) if e["event"] == "reasoning"] == THINKING
    assert finished(out)["outputs"]["reasoning"] == "Two plus two is four."
    other = think("--replay", str(tape), extra="reasoning_effort: high")  # another effort: another request
    assert other.returncode == 1 and "request.reasoning_effort: recorded \"low\", now \"high\"" in other.stderr


# --- the command-line example, chat and batch ----------------------------------------------------------

def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("#### Reasoning models\n", 1)[1].split("\n#### ", 1)[0]


def test_the_readme_example_runs_as_printed(llm) -> None:
    llm.script(Reply(text=["No:", " 7", " x", " 11", " x", " 13."], reasoning=["Try", " 7."]))
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    (line,) = [x for x in _readme_section().splitlines() if x.startswith("flowrunner run ")]
    args = shlex.split(line)
    assert args == ["flowrunner", "run", "flows/reasoning.yaml", "-i", "question=Is 1001 a prime number?",
                    "--show-reasoning"]
    assert f"# Run:   {line}" in (ROOT / "flows" / "reasoning.yaml").read_text()  # the flow says the same
    out = run_cli(*args[1:], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "No: 7 x 11 x 13.\n" and "Try 7.\n" in out.stderr
    body = llm.chat_requests[-1].json
    assert body["model"] == "o4-mini" and body["reasoning_effort"] == "medium" and "temperature" not in body
    assert body["messages"][0]["role"] == "developer"


def test_the_readme_step_is_valid(write_flow) -> None:
    (block,) = re.findall(r"```yaml\n(.*?)```", _readme_section(), re.S)
    flow = write_flow("version: 1\nname: r\ninputs: {question: {type: string}}\n"
                      "connections: {llm: {type: openai, api_key: k}}\nsteps:\n" + block)
    out = run_cli("validate", str(flow))
    assert out.returncode == 0, out.stdout + out.stderr


def test_chat_shows_reasoning_with_the_flag(llm, write_flow) -> None:
    flow = write_flow(FLOW.format(extra=""))
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    for flag, shown in (("--show-reasoning", True), (None, False)):
        llm.script(Reply(text=ANSWER, reasoning=THINKING))
        args = [sys.executable, "-m", "flowrunner", "chat", str(flow), *([flag] if flag else [])]
        out = subprocess.run(args, cwd=ROOT, env=env, input="2+2?\n", capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "The answer is 4.\n"
        assert ("Two plus two is four." in out.stderr) is shown


def test_batch_result_lines_keep_the_usage_details(llm, write_flow, tmp_path: Path) -> None:
    flow = write_flow(FLOW.format(extra=""))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"question": "a"}\n')
    llm.script(Reply(text=ANSWER, reasoning=THINKING, usage=USAGE))
    results = tmp_path / "out.jsonl"
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    out = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(results), env=env)
    assert out.returncode == 0, out.stderr
    (line,) = read_json_lines(results)
    assert line["usage"] == USAGE and line["outputs"]["answer"] == "The answer is 4."


# --- serve ---------------------------------------------------------------------------------------------

SERVED = FLOW.replace("name: think", "name: served-think").format(extra="")


@pytest.fixture(scope="module")
def think_server(openai_server, tmp_path_factory):
    flow = tmp_path_factory.mktemp("serve-think") / "think.yaml"
    flow.write_text(SERVED, encoding="utf-8")
    env_base = openai_server.base_url
    server = Server(flow, env_base)
    yield server
    server.stop()


@pytest.mark.parametrize("field", SPELLINGS)
def test_serve_streams_reasoning_content_to_the_sdk(think_server, llm, field: str) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING, reasoning_field=field, usage=USAGE))
    stream = think_server.client().chat.completions.create(
        model=think_server.name, messages=[{"role": "user", "content": "2+2?"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thinking = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    assert thinking == THINKING  # the SDK keeps the field it does not know (model_extra)
    assert "".join(d.content or "" for d in deltas) == "The answer is 4."
    assert all(not (getattr(d, "reasoning_content", None) and d.content) for d in deltas)  # never mixed
    first_text = next(i for i, d in enumerate(deltas) if d.content)
    assert all(getattr(d, "reasoning_content", None) is None for d in deltas[first_text:])
    usage = chunks[-1].usage
    assert usage.completion_tokens_details.reasoning_tokens == 8
    assert usage.prompt_tokens_details.cached_tokens == 6


def test_serve_puts_reasoning_content_in_a_plain_reply(think_server, llm) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING, reasoning_field="reasoning", usage=USAGE))
    reply = think_server.client().chat.completions.create(model=think_server.name,
                                                          messages=[{"role": "user", "content": "2+2?"}])
    message = reply.choices[0].message
    assert message.content == "The answer is 4."
    assert message.model_extra["reasoning_content"] == "Two plus two is four."
    assert reply.usage.completion_tokens_details.reasoning_tokens == 8
    assert reply.usage.prompt_tokens_details.cached_tokens == 6


def test_serve_sends_no_reasoning_field_for_a_model_without_it(think_server, llm) -> None:
    llm.script(Reply(text=ANSWER))
    reply = think_server.client().chat.completions.create(model=think_server.name,
                                                          messages=[{"role": "user", "content": "hi"}])
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})
    chunks = list(think_server.client().chat.completions.create(
        model=think_server.name, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks if c.choices)


def test_serve_never_puts_the_thinking_in_the_content_of_an_empty_answer(think_server, llm) -> None:
    llm.script(Reply(text=[], reasoning=THINKING))
    reply = think_server.client().chat.completions.create(model=think_server.name,
                                                          messages=[{"role": "user", "content": "2+2?"}])
    message = reply.choices[0].message
    assert message.content == "" and message.model_extra["reasoning_content"] == "Two plus two is four."


def test_serve_responses_api_keeps_the_usage_details(think_server, llm) -> None:
    llm.script(Reply(text=ANSWER, reasoning=THINKING, usage=USAGE))
    response = think_server.client().responses.create(model=think_server.name, input="2+2?")
    assert response.output_text == "The answer is 4."  # the thinking stays out of the answer there too
    assert response.usage.output_tokens_details.reasoning_tokens == 8
    assert response.usage.input_tokens_details.cached_tokens == 6
