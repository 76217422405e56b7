"""Issue 17, items 5, 6, 12, 22 and 25 (its last clause), through the real command line against the
OpenAI-protocol test server and the embedded SQLite history:

- Ctrl-C / SIGTERM after the first streamed words still runs the run_on_failure history save (the
  question and the partial answer, marked partial), within a bounded time, then exits 130 / 143;
  a second Ctrl-C stops at once; the jsonl sink's run_finished carries the run's id, status,
  duration and the outputs so far.
- `batch --resume` re-runs a failed item under the same history turn: its turn is saved once.
- `batch`: a bad row is one failed item (a 200 KB CSV cell, a 5,000-digit integer, a deeply nested
  JSON line, a hand-edited results line); a required input nothing feeds is an error before any item.
- A step's `timeout` does not count opening its connection (importing openai, building the client).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.jsonlines import log_lines, read_json_lines, records_by_index
from tests.support.openai_script import Reply

CHAT_AND_SAVE = """
version: 1
name: interrupted
inputs:
  question: {{type: string}}
  conversation: {{type: string, default: c1}}
connections:
  llm: {{type: openai, api_key: sk-test, base_url: "${{env.TEST_OPENAI_BASE_URL}}", max_retries: 0}}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${{inputs.question}}
{middle}
  - id: remember
    type: history_save
    run_on_failure: true
    create: true
    conversation_id: ${{inputs.conversation}}
    user_prompt: ${{inputs.question}}
    response: ${{response}}
{after}
outputs:
  answer: ${{response}}
"""

SLOW_AGAIN = """\
  - id: again
    type: chat_completion
    run_on_failure: true
    connection: llm
    model: gpt-4o-mini
    user_prompt: again
    result: again"""


def history_rows(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "history.sqlite3") as db:
        return db.execute("SELECT conversation_id, role, content, status FROM chat_history ORDER BY seq").fetchall()


def wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 30) -> None:
    """Polls until `predicate()` holds (a liveness bound, not a timing check)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)


def spawn(flow: Path, llm, tmp_path: Path, *sink: str) -> subprocess.Popen:
    env = {**os.environ, "TEST_OPENAI_BASE_URL": llm.base_url, "FLOWRUNNER_DATA_DIR": str(tmp_path / "data")}
    env.pop("FLOWRUNNER_PLUGINS", None)
    return subprocess.Popen([sys.executable, "-m", "flowrunner", "run", str(flow), "-i", "question=What is RAG?",
                             *sink], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def spawn_with_events(flow: Path, llm, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The run with every event in a jsonl file; returns once its first text event is there."""
    events_file = tmp_path / "events.jsonl"
    proc = spawn(flow, llm, tmp_path, "--sink", f"jsonl:{events_file}")
    wait_for(lambda: events_file.exists() and '"event": "text"' in events_file.read_text(), proc, "the first words")
    return proc, events_file


def texts(events: list[dict], step: str) -> list[str]:
    return [e["text"] for e in events if e["event"] == "text" and e["step"] == step]


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated.")])
def test_a_stopped_run_still_saves_the_partial_turn(llm, write_flow, tmp_path: Path, sig: int, code: int,
                                                    said: str) -> None:
    full = "Retrieval augmented generation" + " and" * 60
    llm.script(Reply(text=["Retrieval", " augmented", " generation"] + [" and"] * 60, chunk_delay=0.1))
    proc = spawn(write_flow(CHAT_AND_SAVE.format(middle="", after="")), llm, tmp_path)  # the text to stdout
    try:
        assert proc.stdout.read(9) == b"Retrieval"  # type: ignore[union-attr]  the first words reached the user
        proc.send_signal(sig)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert said in stderr.decode() and "Traceback" not in stderr.decode()
    seen = ("Retrieval" + rest.decode()).strip()
    assert full.startswith(seen) and seen != full
    # The run_on_failure step ran after the stop: the question and the partial answer (what the user
    # saw), marked partial.
    assert history_rows(tmp_path / "data") == [("c1", "user", "What is RAG?", "partial"),
                                                ("c1", "assistant", seen, "partial")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_runs_run_finished_event(llm, write_flow, tmp_path: Path, sig: int) -> None:
    llm.script(Reply(text=["Retrieval", " augmented", " generation"] + [" and"] * 60, chunk_delay=0.1))
    proc, events_file = spawn_with_events(write_flow(CHAT_AND_SAVE.format(middle="", after="")), llm, tmp_path)
    try:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), stderr
    events = read_json_lines(events_file)
    partial = "".join(texts(events, "answer"))
    assert partial.startswith("Retrieval")
    saved = next(e for e in events if e["event"] == "step_finished" and e["step"] == "remember")
    assert saved["status"] == "ok" and saved["outputs"]["status"] == "partial"
    # The interrupted run's run_finished says which run, how it ended, how long, and the outputs so far.
    finished = events[-1]
    assert finished["event"] == "run_finished" and finished["status"] == "interrupted"
    assert finished["run_id"] == events[0]["run_id"] and finished["duration"] > 0
    assert finished["outputs"] == {"answer": partial}
    assert "was interrupted" in finished["error"]


def test_a_second_ctrl_c_stops_at_once(llm, write_flow, tmp_path: Path) -> None:
    # The run_on_failure step after the stop streams far longer than the time it gets: only a second
    # Ctrl-C ends it before that time is up (and the save after it never starts).
    llm.script(Reply(text=["first"] + [" words"] * 60, chunk_delay=0.1),
               Reply(text=["again"] + [" and again"] * 400, chunk_delay=0.1))
    proc, events_file = spawn_with_events(write_flow(CHAT_AND_SAVE.format(middle=SLOW_AGAIN, after="")), llm,
                                          tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: '"step": "again", "text"' in events_file.read_text(), proc, "the run_on_failure step stream")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr.decode()
    events = read_json_lines(events_file)
    # Stopped at once: not ended by running out of time, and nothing after it started.
    assert not [e for e in events if e["event"] == "step_finished" and e["step"] == "again"]
    assert not [e for e in events if e.get("step") == "remember"]
    assert events[-1]["event"] == "run_finished" and events[-1]["status"] == "interrupted"
    assert events[-1]["run_id"] == events[0]["run_id"]
    assert not (tmp_path / "data" / "history.sqlite3").exists() or history_rows(tmp_path / "data") == []


def test_run_on_failure_steps_after_a_stop_are_bounded(llm, write_flow, tmp_path: Path) -> None:
    llm.script(Reply(text=["first"] + [" words"] * 60, chunk_delay=0.1),
               Reply(text=["again"] + [" and again"] * 2000, chunk_delay=0.1))  # minutes, if nothing stopped it
    proc, events_file = spawn_with_events(write_flow(CHAT_AND_SAVE.format(middle=SLOW_AGAIN, after="")), llm,
                                          tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    events = read_json_lines(events_file)
    again = next(e for e in events if e["event"] == "step_finished" and e["step"] == "again")
    assert again["status"] == "failed" and "the run was interrupted" in again["error"] and "ran out" in again["error"]
    assert again["outputs"]["partial"] is True and again["outputs"]["text"].startswith("again")
    assert events[-1]["event"] == "run_finished" and events[-1]["status"] == "interrupted"


BATCH_SAVE_THEN_FAIL = """
version: 1
name: save-then-fail
inputs:
  question: {type: string}
  conversation: {type: string}
connections:
  llm: {type: openai, api_key: sk-test, base_url: "${env.TEST_OPENAI_BASE_URL}", max_retries: 0}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: "${inputs.question}"}
  - id: remember
    type: history_save
    create: true
    conversation_id: ${inputs.conversation}
    user_prompt: ${inputs.question}
    response: ${response}
  - {id: follow_up, type: chat_completion, connection: llm, model: m, user_prompt: "follow-up", result: more}
outputs:
  answer: ${response}
"""


def test_batch_resume_saves_a_failed_items_turn_once(llm, write_flow, tmp_path: Path) -> None:
    flow = write_flow(BATCH_SAVE_THEN_FAIL)
    inputs = tmp_path / "items.jsonl"
    inputs.write_text("".join(json.dumps({"question": f"q{i}", "conversation": f"conv{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "results.jsonl"
    env = {"TEST_OPENAI_BASE_URL": llm.base_url, "FLOWRUNNER_DATA_DIR": str(tmp_path / "data")}
    failing = True

    def respond(request) -> Reply | None:
        prompt = request.body["messages"][-1]["content"]
        if prompt == "follow-up" and failing:
            return Reply(status=400, error="the follow-up is refused today")
        return Reply(text=f"answer to {prompt}")

    llm.responder = respond
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), env=env)
    assert r.returncode == 1, r.stderr  # every item saved its turn, then failed
    assert len(history_rows(tmp_path / "data")) == 8
    failing = False
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), "--resume", env=env)
    assert r.returncode == 0, r.stderr
    rows = history_rows(tmp_path / "data")
    assert sorted(rows) == sorted([(f"conv{i}", "user", f"q{i}", "complete") for i in range(4)]
                                  + [(f"conv{i}", "assistant", f"answer to q{i}", "complete") for i in range(4)])


SET_FLOW = """
version: 1
name: rows
inputs:
  question: {type: string}
  n: {type: integer, default: 0}
steps:
  - {id: s, type: set, values: {echo: "${inputs.question}"}}
outputs:
  echo: ${echo}
  n: ${inputs.n}
"""


def test_batch_a_bad_csv_row_is_one_failed_item(write_flow, tmp_path: Path) -> None:
    flow = write_flow(SET_FLOW)
    long_cell = "x" * 200_000  # over the csv module's default field limit (128 KiB)
    data = tmp_path / "items.csv"
    data.write_text(f'question,n\nq0,1\n"{long_cell}",2\nq2,{"9" * 5000}\nq3,4\n', encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(data))
    assert r.returncode == 1, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    recs = records_by_index(r.stdout)
    assert sorted(recs) == [0, 1, 2, 3]
    assert recs[1]["status"] == "ok" and recs[1]["outputs"]["echo"] == long_cell  # a long cell is a value
    assert recs[2]["status"] == "failed" and "items.csv:4:1: input 'n'" in recs[2]["error"]
    assert [recs[i]["status"] for i in (0, 3)] == ["ok", "ok"]


def test_batch_a_bad_jsonl_line_is_one_failed_item(write_flow, tmp_path: Path) -> None:
    flow = write_flow(SET_FLOW)
    data = tmp_path / "items.jsonl"
    lines = ['{"question": "q0"}', '{"question": "q1", "n": ' + "9" * 5000 + "}",
             '{"question": "q2", "n": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"question": "q3", "n": 3}']
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(data))
    assert r.returncode == 1, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    recs = records_by_index(r.stdout)
    assert [recs[i]["status"] for i in range(4)] == ["ok", "failed", "failed", "ok"]
    assert "items.jsonl:2:1: a number too long to read" in recs[1]["error"]
    assert "items.jsonl:3:1: a value nested too deeply" in recs[2]["error"]
    assert recs[3]["outputs"] == {"echo": "q3", "n": 3}


def test_batch_resume_over_a_hand_edited_results_line(write_flow, tmp_path: Path) -> None:
    flow = write_flow(SET_FLOW)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(3)), encoding="utf-8")
    out = tmp_path / "results.jsonl"
    ok = {"index": 0, "inputs": {"question": "q0", "n": 0}, "outputs": {"echo": "q0", "n": 0}, "status": "ok",
          "error": None, "usage": None, "latency": 0.1}
    edited = {**ok, "index": [1], "inputs": {"question": "q1", "n": 0}}  # someone "fixed" it by hand
    out.write_text(json.dumps(ok) + "\n" + json.dumps(edited) + "\n", encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(data), "--output", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr
    final = read_json_lines(out)
    assert sorted(rec["index"] for rec in final) == [0, 1, 2]  # each item exactly once
    warned = [line for line in log_lines(r.stderr) if "index is not an item number" in line["event"]]
    assert warned and warned[0]["line"] == 2


def test_batch_a_required_input_nothing_feeds_is_an_error_before_any_item(write_flow, tmp_path: Path) -> None:
    flow = write_flow(SET_FLOW)
    data = tmp_path / "items.csv"
    data.write_text("prompt,id\nhello,1\nworld,2\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    r = run_cli("batch", str(flow), "--inputs", str(data), "--output", str(out))
    assert r.returncode == 2, r.stderr
    assert "input 'question' is required" in r.stderr and "prompt, id" in r.stderr
    assert "--map question=" in r.stderr
    assert not out.exists() or out.read_text() == ""  # no item ran
    jsonl_data = tmp_path / "items.jsonl"
    jsonl_data.write_text('{"prompt": "hello"}\n{"prompt": "world", "extra": 1}\n', encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(jsonl_data))
    assert r.returncode == 2 and "input 'question' is required" in r.stderr and "prompt, extra" in r.stderr
    # Fed by --map or -i: it runs.
    r = run_cli("batch", str(flow), "--inputs", str(data), "--map", "question=prompt")
    assert r.returncode == 0, r.stderr
    r = run_cli("batch", str(flow), "--inputs", str(data), "-i", "question=same for all")
    assert r.returncode == 0, r.stderr


def test_batch_ignored_columns_are_reported_before_the_run(write_flow, tmp_path: Path) -> None:
    flow = write_flow(SET_FLOW)
    data = tmp_path / "items.csv"
    data.write_text("question,id,notes\nhello,1,a\nworld,2,b\n", encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(data))
    assert r.returncode == 0, r.stderr
    events = [line["event"] for line in log_lines(r.stderr)]
    ignored = events.index("columns that feed no input were ignored")
    assert ignored < events.index("item finished") and ignored < events.index("batch finished")
    assert next(line for line in log_lines(r.stderr) if line["event"].startswith("columns"))["columns"] == ["id", "notes"]


def test_a_step_timeout_does_not_count_opening_its_connection(llm, write_flow) -> None:
    """`timeout: 0.5` on the chat step: importing openai and building its client (the connection's
    opening, often more than 0.5 s) is not the step's work; the answer from a fast server is."""
    flow = write_flow("""
version: 1
name: quick
connections:
  llm: {type: openai, api_key: sk-test, base_url: "${env.TEST_OPENAI_BASE_URL}"}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: hi, timeout: 0.5}
""")
    llm.default_reply = Reply(text="fast")
    for _ in range(3):
        r = run_cli("run", str(flow), env={"TEST_OPENAI_BASE_URL": llm.base_url})
        assert r.returncode == 0, r.stderr
        assert r.stdout == "fast\n"
    assert len(llm.chat_requests) == 3
