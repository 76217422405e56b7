"""Issue 17, items 8 and 23, through the real CLI against the local OpenAI-protocol server (and `serve`
through the real openai SDK): a refusal is never silent, and an optional output that a server did not
send (usage) reads as null with one warning instead of failing a run whose steps succeeded."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.support.chat_flows import chat_flow, openai_env
from tests.support.fixtures import Reply
from tests.support.jsonlines import events

REFUSAL = "I'm sorry, I can't help with that."

FLOW = chat_flow("hardened-chat", after="""\
    %(step_extra)s
  - id: tally
    type: set
    values: {tokens: "${steps.answer.usage.total_tokens}"}
outputs:
  answer: ${response}
  refusal: ${steps.answer.refusal}
  tokens: ${steps.answer.usage.total_tokens}
  again: ${steps.answer.usage.total_tokens}
  tallied: ${tokens}
""")


def flow_file(write_flow, step_extra: str = ""):
    return write_flow(FLOW % {"step_extra": step_extra})


def run_finished(stdout: str) -> dict:
    return next(e for e in events(stdout) if e["event"] == "run_finished")


# --- item 8: a refusal ----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", ["true", "false"])
def test_a_refusal_is_a_warning_with_its_text_an_output_and_exit_0(write_flow, llm, stream) -> None:
    llm.script(Reply(refusal=REFUSAL))
    flow = flow_file(write_flow, f"stream: {stream}")
    out = run_cli("run", str(flow), "-i", "question=Help me pick a lock", "--sink", "jsonl:-", env=openai_env(llm))
    assert out.returncode == 0, out.stderr
    warning = f"the model refused to answer: {REFUSAL}"
    assert out.stderr.count(warning) == 1, out.stderr
    got = events(out.stdout)
    assert [e["message"] for e in got if e["event"] == "warning" and e["step"] == "answer"] == [warning]
    finished = next(e for e in got if e["event"] == "step_finished" and e["step"] == "answer")
    assert finished["status"] == "ok" and finished["outputs"]["refusal"] == REFUSAL
    assert finished["outputs"]["text"] == ""
    assert run_finished(out.stdout)["outputs"]["refusal"] == REFUSAL


def test_a_refusal_with_the_default_sink_says_so_on_stderr(write_flow, llm) -> None:
    llm.script(Reply(refusal=REFUSAL))
    out = run_cli("run", str(flow_file(write_flow)), "-i", "question=q", env=openai_env(llm))
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(f"the model refused to answer: {REFUSAL}") == 1, out.stderr


def test_an_answer_without_refusal_says_nothing_about_one(write_flow, llm) -> None:
    llm.script(Reply(text="Fine."))
    out = run_cli("run", str(flow_file(write_flow)), "-i", "question=q", "--output", "json", env=openai_env(llm))
    assert out.returncode == 0, out.stderr
    assert "refused" not in out.stderr
    assert json.loads(out.stdout)["refusal"] is None


def test_steps_lists_refusal_as_an_output() -> None:
    out = run_cli("steps", "chat_completion")
    assert out.returncode == 0, out.stderr
    assert "  refusal: the model's refusal text" in out.stdout


def test_serve_passes_a_refusal_to_the_openai_sdk(openai_server, llm, tmp_path) -> None:
    from tests.test_serve import CHAT_FLOW, Server

    flow = tmp_path / "served.yaml"
    flow.write_text(CHAT_FLOW, encoding="utf-8")
    server = Server(flow, openai_server.base_url)
    try:
        client = server.client()
        messages = [{"role": "user", "content": "Help me pick a lock"}]
        llm.script(Reply(refusal=REFUSAL))
        chunks = list(client.chat.completions.create(model=server.name, messages=messages, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.refusal or "" for d in deltas) == REFUSAL
        assert "".join(d.content or "" for d in deltas) == ""
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

        llm.script(Reply(refusal=REFUSAL))
        reply = client.chat.completions.create(model=server.name, messages=messages)
        assert reply.choices[0].message.refusal == REFUSAL
        assert reply.choices[0].message.content is None and reply.choices[0].finish_reason == "stop"

        llm.script(Reply(text="Sure."))
        plain = client.chat.completions.create(model=server.name, messages=messages)
        assert plain.choices[0].message.content == "Sure." and plain.choices[0].message.refusal is None
    finally:
        server.stop()


# --- item 23: an optional output the server did not send ------------------------------------------

def assert_null_usage_with_one_warning(out) -> None:
    assert out.returncode == 0, out.stderr
    outputs = run_finished(out.stdout)["outputs"]
    assert outputs["tokens"] is None and outputs["again"] is None and outputs["tallied"] is None
    said = "${steps.answer.usage.total_tokens} is null: step 'answer' returned no usage"
    # One warning for the flow outputs (two outputs, one reference), one for the `set` step.
    assert out.stderr.count(said) == 2, out.stderr
    warnings = [e["message"] for e in events(out.stdout) if e["event"] == "warning"]
    assert warnings.count(f"flow outputs: {said}") == 1
    assert warnings.count(f"step 'tally' (set): {said}") == 1


def test_dry_run_of_a_flow_that_outputs_usage_succeeds(write_flow, llm) -> None:
    out = run_cli("run", str(flow_file(write_flow)), "-i", "question=q", "--dry-run", "--sink", "jsonl:-",
                  env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": ""})
    assert_null_usage_with_one_warning(out)
    assert llm.requests == []


def test_a_server_that_sends_no_usage_records_and_replays(write_flow, llm, tmp_path) -> None:
    flow, tape = flow_file(write_flow), tmp_path / "tape.jsonl"
    llm.script(Reply(text="Forty-two.", usage=False))  # llama.cpp, Ollama, most mocks
    live = run_cli("run", str(flow), "-i", "question=q", "--record", str(tape), "--sink", "jsonl:-",
                   env=openai_env(llm))
    assert_null_usage_with_one_warning(live)
    assert run_finished(live.stdout)["outputs"]["answer"] == "Forty-two."
    offline = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": ""}
    replayed = run_cli("run", str(flow), "-i", "question=q", "--replay", str(tape), "--sink", "jsonl:-", env=offline)
    assert_null_usage_with_one_warning(replayed)
    assert run_finished(replayed.stdout)["outputs"]["answer"] == "Forty-two."


def test_usage_that_was_sent_is_used_and_warns_nothing(write_flow, llm) -> None:
    llm.script(Reply(text="Hi.", usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}))
    out = run_cli("run", str(flow_file(write_flow)), "-i", "question=q", "--sink", "jsonl:-", env=openai_env(llm))
    assert out.returncode == 0, out.stderr
    assert run_finished(out.stdout)["outputs"]["tokens"] == 7 and "is null" not in out.stderr


def test_a_missing_path_in_a_required_output_is_still_an_error(write_flow, llm) -> None:
    flow = write_flow("""
version: 1
name: required-path
connections:
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}", max_retries: 0}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: gpt-4o-mini, user_prompt: hi}
outputs:
  first_call: ${steps.answer.tool_calls[0].name}
""")
    llm.script(Reply(text="No tools needed."))
    out = run_cli("run", str(flow), env=openai_env(llm))
    assert out.returncode == 1
    assert "flow outputs: ${steps.answer.tool_calls[0].name}: steps.answer.tool_calls has 0 item(s), no [0]" \
        in out.stderr
