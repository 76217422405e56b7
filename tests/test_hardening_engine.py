"""The engine after review of issue 17's hardening:

- who a cancellation stops how: `run` / `chat` / `batch` on Ctrl-C give the run_on_failure steps
  their grace; `serve` (a client that left) and `batch --fail-fast` stop the run at once;
- the cancellation reaches the caller even when it stops reading at RunFinished;
- a connection's setup error after a step ran keeps every problem;
- the connections' environment is checked once, for the connections the steps use (serve, batch).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import aclosing
from pathlib import Path

import pytest

from flowrunner.engine import Run
from flowrunner.events import RunFinished, StepFinished, TextDelta
from flowrunner.flow.build import load_flow_with
from tests.conftest import run_cli
from tests.support.openai_script import Reply
from tests.test_serve import HISTORY_FLOW, Server, serve, text_of, user  # noqa: F401 - `serve` is a fixture

STALL = dict(stall_after=1, stall=600)  # longer than any test: only a closed connection ends it

GRACE_FLOW = """
version: 1
name: grace
connections:
  llm: {type: openai, api_key: sk-test, base_url: "${env.TEST_OPENAI_BASE_URL}", max_retries: 0}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: hi}
  - {id: after, type: set, run_on_failure: true, values: {cleaned: true}}
"""


async def _consume(run: Run, seen: list) -> None:
    """A consumer that stops reading at RunFinished, as a caller that wants only the outcome may."""
    async with aclosing(run.events()) as events:
        async for event in events:
            seen.append(event)
            if isinstance(event, RunFinished):
                break


async def _cancel_mid_answer(run: Run) -> tuple[asyncio.Task, list]:
    seen: list = []
    task = asyncio.create_task(_consume(run, seen))
    for _ in range(3000):  # a liveness bound: the first words come at once
        if any(isinstance(e, TextDelta) for e in seen) or task.done():
            break
        await asyncio.sleep(0.01)
    assert any(isinstance(e, TextDelta) for e in seen), seen
    task.cancel()
    await asyncio.wait({task})
    return task, seen


@pytest.mark.parametrize("grace", [True, False])
def test_the_caller_chooses_whether_run_on_failure_steps_run_after_a_cancellation(llm, write_flow, grace) -> None:
    llm.script(Reply(text=["First", " words", " never", " finished"], **STALL))
    flow = load_flow_with(write_flow(GRACE_FLOW), None)
    run = Run(flow, {}, env={"TEST_OPENAI_BASE_URL": llm.base_url}, grace_on_cancel=grace)
    task, seen = asyncio.run(_cancel_mid_answer(run))
    # The cancellation goes on to the caller although it stopped reading at RunFinished.
    assert task.cancelled()
    assert isinstance(seen[-1], RunFinished) and seen[-1].status == "interrupted"
    finished = {e.step: e.status for e in seen if isinstance(e, StepFinished)}
    if grace:  # Ctrl-C of `run`, `chat`, `batch`: the interrupted step ends failed, the clean-up still runs
        assert finished == {"answer": "failed", "after": "ok"}
        assert run.step_outputs["after"] == {"cleaned": True}
    else:  # `serve`'s client left, `batch --fail-fast`: stopped at once
        assert finished == {} and "after" not in run.step_outputs
    assert llm.wait_for_disconnect(timeout=10)  # either way the model's stream was closed


SERVE_REMEMBERS = HISTORY_FLOW.replace('response: "${response}", create: true}',
                                       'response: "${response}", create: true, run_on_failure: true}')


def _turns(db: Path, conversation: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT role, content, status FROM chat_history WHERE conversation_id = ? ORDER BY seq",
                           (conversation,)).fetchall()


def _request_statuses(server: Server, count: int) -> list[int]:
    """The statuses of serve's `request` log lines, once there are `count` (written when a request is done)."""
    import time

    for _ in range(3000):  # a liveness bound
        statuses = [r["status"] for r in map(_json, server.lines) if isinstance(r, dict) and r.get("event") == "request"]
        if len(statuses) >= count:
            return statuses
        time.sleep(0.01)
    return statuses


def _json(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def test_serve_stops_the_run_of_a_client_that_left_at_once(serve, llm, tmp_path) -> None:
    assert SERVE_REMEMBERS != HISTORY_FLOW
    server = serve(SERVE_REMEMBERS)
    llm.script(Reply(text="a1"), Reply(text=["Half", " an", " answer", " never", " finished"], stall_after=2,
                                       stall=600))
    client = server.client()
    client.chat.completions.create(model=server.name, messages=user("q1"), extra_body={"conversation_id": "c-9"})
    with client.chat.completions.create(model=server.name, messages=user("q2"), stream=True,
                                        extra_body={"conversation_id": "c-9"}) as stream:
        got = ""
        for chunk in stream:
            got += text_of([chunk])
            if got == "Half an":
                break  # the client hangs up mid-answer
    assert llm.wait_for_disconnect(timeout=10)
    assert _request_statuses(server, 2) == [200, 499]  # the second request is over: its run has ended
    # The run_on_failure save did not run: the conversation holds the first turn, no half second one.
    assert _turns(tmp_path / "history.sqlite3", "c-9") == [("user", "q1", "complete"), ("assistant", "a1", "complete")]


BATCH_FLOW = """
version: 1
name: batch-fail-fast
inputs:
  question: {type: string}
connections:
  llm: {type: openai, api_key: sk-test-key, base_url: "${env.TEST_OPENAI_BASE_URL}", max_retries: 0}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: "${inputs.question}"}
  - {id: remember, type: history_save, run_on_failure: true, create: true,
     conversation_id: "${inputs.question}", user_prompt: "${inputs.question}", response: "${response}"}
"""


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_batch_fail_fast_stops_the_items_in_flight_at_once(write_flow, llm, tmp_path) -> None:
    # q0 fails (a 400, never retried) while q1 waits for a model that never finishes.
    llm.responder = lambda request: (Reply(status=400, error="bad") if request.body["messages"][-1]["content"] == "q0"
                                     else Reply(text=["never", " finished"], **STALL))
    flow = write_flow(BATCH_FLOW)
    items, out, data = _jsonl(tmp_path / "items.jsonl", [{"question": "q0"}, {"question": "q1"}]), \
        tmp_path / "results.jsonl", tmp_path / "data"
    r = run_cli("batch", str(flow), "--inputs", str(items), "--output", str(out), "--concurrency", "2", "--fail-fast",
                env={"TEST_OPENAI_BASE_URL": llm.base_url, "FLOWRUNNER_DATA_DIR": str(data)})
    assert r.returncode == 1, r.stderr
    assert [(rec["index"], rec["status"]) for rec in map(json.loads, out.read_text().splitlines())] == [(0, "failed")]
    db = data / "history.sqlite3"
    assert _turns(db, "q0") == [("user", "q0", "partial")]  # q0's own failure: its run_on_failure step ran
    assert _turns(db, "q1") == []  # q1 was stopped by --fail-fast: at once, nothing saved


def test_batch_checks_only_the_connections_the_steps_use(write_flow, llm, tmp_path) -> None:
    # The `spare` connection needs an unset variable, but no step uses it: not a problem, as for `run`.
    flow = write_flow(BATCH_FLOW.replace("max_retries: 0}", 'max_retries: 0}\n  spare: {type: openai, '
                                         'api_key: "${env.FR_TEST_SPARE_KEY}"}'))
    items, out = _jsonl(tmp_path / "items.jsonl", [{"question": "q0"}]), tmp_path / "results.jsonl"
    r = run_cli("batch", str(flow), "--inputs", str(items), "--output", str(out),
                env={"TEST_OPENAI_BASE_URL": llm.base_url, "FLOWRUNNER_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 0, r.stderr


def test_serve_checks_only_the_connections_the_steps_use(serve, llm) -> None:
    server = serve(HISTORY_FLOW.replace("  history: {type: sqlite", '  spare: {type: openai, api_key: '
                                        '"${env.FR_TEST_SPARE_KEY}"}\n  history: {type: sqlite'))
    llm.script(Reply(text="fine"))
    reply = server.client().chat.completions.create(model=server.name, messages=user("q"))
    assert reply.choices[0].message.content == "fine"


TWO_UNSET = """
version: 1
name: two-unset
inputs:
  c: {type: string}
connections:
  bad: {type: openai, api_key: "sk-${env.FR_TEST_UNSET_KEY}", base_url: "http://${env.FR_TEST_UNSET_HOST}/v1"}
steps:
  - {id: first, type: set, values: {a: 1}}
  - {id: answer, type: chat_completion, connection: "${inputs.c}", model: m, user_prompt: hi}
"""


def test_a_setup_error_after_a_step_ran_keeps_every_problem(cli, write_flow) -> None:
    out = cli("run", str(write_flow(TWO_UNSET)), "-i", "c=bad")
    assert out.returncode == 1, out.stderr  # a step has run: a run failure, not exit 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert [e.split("failed: ", 1)[1] for e in errors] == [
        "environment variable FR_TEST_UNSET_KEY is not set", "environment variable FR_TEST_UNSET_HOST is not set"]
