"""Testing flows without a model: `run --dry-run`, `--record FILE` and `--replay FILE`, through the
real CLI against the local OpenAI-protocol server (and, for the RAG flow, the test PostgreSQL)."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from tests.support.chat_flows import chat_flow, openai_env
from tests.support.fixtures import Reply
from tests.support.jsonlines import json_lines

FLOW = chat_flow("replayed", before="    system_prompt: Be brief.\n", after="""\
    context: [first passage, second passage]
    temperature: 0.2
""")


def texts(stdout: str) -> list[str]:
    return [e["text"] for e in json_lines(stdout) if e["event"] == "text"]


def test_dry_run_prints_the_request_and_calls_no_model(write_flow, llm) -> None:
    flow = write_flow(FLOW)
    out = run_cli("run", str(flow), "-i", "question=What is up?", "--dry-run",
                  env={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": ""})  # no key needed
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["step"] == "answer" and shown["request"]["model"] == "gpt-4o-mini"
    assert shown["request"]["temperature"] == 0.2
    messages = shown["request"]["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert "[1] first passage" in messages[1]["content"] and "What is up?" in messages[1]["content"]
    assert llm.requests == []


def test_record_then_replay_with_the_same_chunking_offline(write_flow, llm, tmp_path) -> None:
    flow, tape = write_flow(FLOW), tmp_path / "tape.jsonl"
    env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "sk-recording-key-123"}
    llm.script(Reply(text=["Forty", "-two", ", of", " course."]))
    live = run_cli("run", str(flow), "-i", "question=Answer?", "--record", str(tape), "--sink", "jsonl:-", env=env)
    assert live.returncode == 0, live.stderr
    assert texts(live.stdout) == ["Forty", "-two", ", of", " course."]
    record = json.loads(tape.read_text().splitlines()[0])
    assert record["step"] == "answer" and record["chunks"][-1] == "[DONE]"
    assert "sk-recording-key-123" not in tape.read_text()
    served = len(llm.requests)
    # The replay reaches no server: the base URL points at nothing.
    offline = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": ""}
    replay = run_cli("run", str(flow), "-i", "question=Answer?", "--replay", str(tape), "--sink", "jsonl:-",
                     env=offline)
    assert replay.returncode == 0, replay.stderr
    assert texts(replay.stdout) == texts(live.stdout)
    finished = [e for e in json_lines(replay.stdout) if e["event"] == "step_finished"][0]
    assert finished["outputs"]["text"] == "Forty-two, of course." and finished["outputs"]["finish_reason"] == "stop"
    assert len(llm.requests) == served
    plain = run_cli("run", str(flow), "-i", "question=Answer?", "--replay", str(tape), env=offline)
    assert plain.stdout.startswith("Forty-two, of course.")


def test_a_replay_that_does_not_match_the_request_fails_clearly(write_flow, llm, tmp_path) -> None:
    flow, tape = write_flow(FLOW), tmp_path / "tape.jsonl"
    llm.script(Reply(text="Yes."))
    env = openai_env(llm, "sk-test")
    assert run_cli("run", str(flow), "-i", "question=Is it on?", "--record", str(tape), env=env).returncode == 0
    out = run_cli("run", str(flow), "-i", "question=Is it off?", "--replay", str(tape), env=env)
    assert out.returncode == 1
    assert "replay mismatch: the chat request differs" in out.stderr
    assert "request.messages[1].content" in out.stderr and "Is it on?" in out.stderr and "Is it off?" in out.stderr
    assert "record again with --record FILE" in out.stderr and "Traceback" not in out.stderr
    # Played once each: a second call for the same request finds nothing left.
    flow2 = write_flow(FLOW + FLOW[FLOW.index("  - id: answer"):].replace("id: answer", "id: again"), "twice.yaml")
    out = run_cli("run", str(flow2), "-i", "question=Is it on?", "--replay", str(tape), env=env)
    assert out.returncode == 1 and "no recording left" in out.stderr


def test_a_broken_stream_replays_broken(write_flow, llm, tmp_path) -> None:
    flow, tape = write_flow(FLOW), tmp_path / "tape.jsonl"
    env = openai_env(llm, "sk-test")
    llm.script(Reply(text=["Half", " an", " answer", " and", " more"], disconnect_after=2))
    live = run_cli("run", str(flow), "-i", "question=q", "--record", str(tape), env=env)
    replay = run_cli("run", str(flow), "-i", "question=q", "--replay", str(tape), env=env)
    assert live.returncode == replay.returncode == 1
    assert replay.stdout == live.stdout == "Half an\n"
    assert "no finish_reason" in replay.stderr


def test_bad_replay_files_and_flag_combinations(write_flow, tmp_path) -> None:
    flow = write_flow(FLOW)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": "answer", "request": {}, "chunks": []}\nnot json\n')
    out = run_cli("run", str(flow), "-i", "question=q", "--replay", str(bad))
    assert out.returncode == 2 and f"{bad}:2:1: --replay: not a recording made with --record" in out.stderr
    out = run_cli("run", str(flow), "-i", "question=q", "--replay", str(bad), "--dry-run")
    assert out.returncode == 2 and "exclude each other" in out.stderr


def test_the_rag_example_records_and_replays_without_any_model_server(pg, llm, tmp_path) -> None:
    env = {**pg.env, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    (pg.root / "history.sqlite3").unlink(missing_ok=True)
    assert run_cli("run", "flows/ingest_docs.yaml", env=env).returncode == 0
    tape = tmp_path / "rag.jsonl"
    llm.script(Reply(text=["It adds", " vectors."]))
    args = ("run", "flows/rag_chat.yaml", "-i", "question=What does pgvector add?", "-i", "conversation_id=recording")
    live = run_cli(*args, "--record", str(tape), env=env)
    assert live.returncode == 0, live.stderr
    kinds = [rec.get("kind", "chat") for rec in json_lines(tape.read_text())]
    assert sorted(kinds[:2]) == ["embedding", "history"] and kinds[2:] == ["chat"]  # the first two run in parallel
    # Replayed under another conversation: a replay saves nothing and serves the recorded history, so it
    # repeats exactly.
    replay_args = (*args[:-1], "conversation_id=ci")
    served = len(llm.requests)
    for _ in range(2):
        replay = run_cli(*replay_args, "--replay", str(tape), env={**env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout == live.stdout and replay.stdout.startswith("It adds vectors.")
    assert len(llm.requests) == served
    assert "not saved" in replay.stderr


def test_a_recording_masks_secrets_and_still_replays(write_flow, llm, tmp_path) -> None:
    """A 4-character DSN password that also occurs in the question is masked in the recording; the
    replay compares the masked request with the masked recording, so it still matches."""
    flow = write_flow(FLOW.replace('max_retries: 0}', 'max_retries: 0}\n  db: {type: postgres, dsn: "postgresql://u:chat@h/db"}'))
    tape, env = tmp_path / "tape.jsonl", openai_env(llm, "sk-test")
    llm.script(Reply(text="History is kept."))
    q = "question=how does chat history work?"
    assert run_cli("run", str(flow), "-i", q, "--record", str(tape), env=env).returncode == 0
    assert "chat history" not in tape.read_text() and "*** history" in tape.read_text()
    out = run_cli("run", str(flow), "-i", q, "--replay", str(tape), env=env)
    assert out.returncode == 0, out.stderr


def test_record_leaves_an_old_recording_alone_when_the_flow_does_not_load(write_flow, tmp_path) -> None:
    tape = tmp_path / "tape.jsonl"
    tape.write_text("precious\n")
    broken = write_flow("version: 1\nname: x\nsteps: []\n", "broken.yaml")
    out = run_cli("run", str(broken), "--record", str(tape))
    assert out.returncode == 2 and tape.read_text() == "precious\n"
