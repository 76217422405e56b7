"""`flowrunner batch` against the OpenAI test server: every item recorded exactly once with the right
status (429s, broken streams, a SIGKILL and --resume), CSV and JSONL, --map, the rate limit as the
server measured it, --fail-fast, the progress bar on a terminal and JSON logs without one."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.chat_flows import chat_flow
from tests.support.jsonlines import log_lines, read_json_lines, records_by_index
from tests.support.openai_script import Reply

FLOW = chat_flow(
    "batch-test",
    inputs="  question: {type: string}\n  n: {type: integer, default: 0}",
    connection='llm: {type: openai, api_key: sk-test-key, base_url: "${env.TEST_OPENAI_BASE_URL}", max_retries: 1}',
    after="""\
outputs:
  answer: ${response}
  n: ${inputs.n}
""")


@pytest.fixture
def flow(write_flow) -> Path:
    return write_flow(FLOW)


@pytest.fixture
def env(llm) -> dict[str, str]:
    return {"TEST_OPENAI_BASE_URL": llm.base_url}


def question(request) -> str:
    return request.body["messages"][-1]["content"]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_200_items_with_429s_and_broken_streams_each_recorded_once(flow, env, llm, tmp_path) -> None:
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def respond(request) -> Reply:
        q = question(request)
        i = int(q[1:])
        with lock:
            seen[q] += 1
            attempt = seen[q]
        if i % 10 == 3:  # rate limited on every try: fails after the SDK's retry
            return Reply(status=429, retry_after_ms=1, error="Rate limit reached")
        if i % 10 == 5 and attempt == 1:  # rate limited once: the retry succeeds
            return Reply(status=429, retry_after_ms=1)
        if i % 10 == 7:  # the stream breaks after some text: failed, never retried
            return Reply(text=f"answer {i} cut short here", disconnect_after=2)
        return Reply(text=f"answer {i}")

    llm.responder = respond
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}", "n": i} for i in range(200)])
    out = tmp_path / "results.jsonl"
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), "--concurrency", "16",
                env=env, timeout=120)
    assert r.returncode == 1, r.stderr  # some items failed
    records = read_json_lines(out)
    assert sorted(rec["index"] for rec in records) == list(range(200))  # each exactly once
    for rec in records:
        i = rec["index"]
        assert rec["inputs"] == {"question": f"q{i}", "n": i}
        if i % 10 == 3:
            assert rec["status"] == "failed" and "rate limited (429)" in rec["error"], rec
        elif i % 10 == 7:
            assert rec["status"] == "failed" and "broke" in rec["error"], rec
        else:
            assert rec["status"] == "ok", rec
            assert rec["outputs"] == {"answer": f"answer {i}", "n": i}
            assert rec["usage"]["completion_tokens"] == 2 and rec["latency"] > 0
    assert all(seen[f"q{i}"] == 2 for i in range(5, 200, 10))  # the one 429, then the retry
    # One SDK client for the whole batch: its keep-alive connections carry many items each (a client per
    # item would open at least 200 connections).
    assert len({req.connection for req in llm.chat_requests}) < 100
    summary = [line for line in log_lines(r.stderr) if line["event"] == "batch finished"][0]
    assert (summary["items"], summary["ok"], summary["failed"]) == (200, 160, 40)
    assert summary["completion_tokens"] == 160 * 2
    # Under cron the log has one line per item, not the engine's lines of every run.
    events = Counter(line["event"] for line in log_lines(r.stderr))
    assert events["item finished"] == 160 and events["item failed"] == 40 and events["step started"] == 0


def test_resume_after_sigkill_ends_with_every_item_exactly_once(flow, env, llm, tmp_path) -> None:
    llm.responder = lambda request: Reply(text=f"answer to {question(request)}", chunk_delay=0.03)
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}"} for i in range(60)])
    out = tmp_path / "results.jsonl"
    args = [sys.executable, "-m", "flowrunner", "batch", str(flow), "--inputs", str(inputs), "--output", str(out),
            "--concurrency", "4"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count("\n") >= 10):
            assert proc.poll() is None and time.monotonic() < deadline, "the batch ended before it was killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    first = read_json_lines(out)
    assert 10 <= len(first) < 60
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), "--resume", "--concurrency", "4",
                env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    final = read_json_lines(out)
    assert sorted(rec["index"] for rec in final) == list(range(60))
    assert all(rec["status"] == "ok" and rec["outputs"]["answer"] == f"answer to q{rec['index']}" for rec in final)
    asked = Counter(question(req) for req in llm.chat_requests)
    assert all(asked[f"q{rec['index']}"] == 1 for rec in first)  # what was done was not asked again
    summary = [line for line in log_lines(r.stderr) if line["event"] == "batch finished"][0]
    assert summary["skipped"] == len(first) and summary["ok"] == 60 - len(first)


def test_resume_drops_a_torn_line_and_reruns_failed_items(flow, env, llm, tmp_path) -> None:
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}"} for i in range(4)])
    out = tmp_path / "results.jsonl"
    done = {"index": 0, "inputs": {"question": "q0", "n": 0}, "outputs": {"answer": "kept"}, "status": "ok",
            "error": None, "usage": None, "latency": 0.1}
    failed = {**done, "index": 1, "inputs": {"question": "q1", "n": 0}, "status": "failed", "error": "boom"}
    out.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n" + '{"index": 2, "inpu', encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), "--resume", env=env)
    assert r.returncode == 0, r.stderr
    final = sorted(read_json_lines(out), key=lambda rec: rec["index"])
    assert [rec["index"] for rec in final] == [0, 1, 2, 3]
    assert final[0]["outputs"] == {"answer": "kept"}  # not run again
    assert all(rec["status"] == "ok" for rec in final)
    assert sorted(question(req) for req in llm.chat_requests) == ["q1", "q2", "q3"]


def test_resume_refuses_results_of_other_inputs(flow, env, llm, tmp_path) -> None:
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": "q0"}, {"question": "q1"}])
    out = tmp_path / "results.jsonl"
    assert run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), env=env).returncode == 0
    jsonl(inputs, [{"question": "changed"}, {"question": "q1"}, {"question": "q2"}])
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), "--resume", env=env)
    assert r.returncode == 2
    assert "holds item 0 with other inputs" in r.stderr and "items.jsonl:1" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_existing_results_file_is_never_overwritten(flow, env, llm, tmp_path) -> None:
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": "q0"}])
    out = tmp_path / "results.jsonl"
    out.write_text('{"index": 0}\n')
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), env=env)
    assert r.returncode == 2 and "already holds results" in r.stderr and "--resume" in r.stderr
    assert out.read_text() == '{"index": 0}\n'
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--resume", env=env)
    assert r.returncode == 2 and "--resume needs --output" in r.stderr
    assert not llm.chat_requests


def test_csv_with_map_constants_defaults_and_bad_rows(flow, env, llm, tmp_path) -> None:
    llm.responder = lambda request: Reply(text=f"re: {question(request)}")
    data = tmp_path / "items.csv"
    data.write_text('id,prompt,n\n1,"first, with a comma",5\n2,"two\nlines",\n3,third,x\n4,fourth\n',
                    encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(data), "--map", "question=prompt", env=env)
    assert r.returncode == 1, r.stderr  # rows 3 and 4 are bad
    records = records_by_index(r.stdout)  # no --output: stdout
    assert records[0]["outputs"] == {"answer": "re: first, with a comma", "n": 5}
    assert records[1]["outputs"] == {"answer": "re: two\nlines", "n": 0}  # an empty cell: the default
    assert records[2]["status"] == "failed" and "items.csv:5:1: input 'n': expected an integer" in records[2]["error"]
    assert records[3]["status"] == "failed" and "items.csv:6:1: expected 3 columns" in records[3]["error"]
    assert len(llm.chat_requests) == 2  # bad rows never reach the model
    assert any(line["event"] == "columns that feed no input were ignored" and line["columns"] == ["id"]
               for line in log_lines(r.stderr))

    r = run_cli("batch", str(flow), "--inputs", str(data), "--map", "question=promt", env=env)
    assert r.returncode == 2 and "--map names column 'promt'" in r.stderr and "id, prompt, n" in r.stderr
    r = run_cli("batch", str(flow), "--inputs", str(data), "--map", "quesiton=prompt", env=env)
    assert r.returncode == 2 and "no input 'quesiton'" in r.stderr


def test_jsonl_bad_lines_and_constants(flow, env, llm, tmp_path) -> None:
    data = tmp_path / "items.jsonl"
    data.write_text('{"question": "a"}\n\n[1, 2]\n{"question": "b", "n": "7"}\n{broken\n{"n": 2}\n', encoding="utf-8")
    r = run_cli("batch", str(flow), "--inputs", str(data), "-i", "n=3", env=env)
    assert r.returncode == 1
    records = records_by_index(r.stdout)
    assert records[0]["status"] == "ok" and records[0]["inputs"] == {"question": "a", "n": 3}  # -i for every item
    assert "items.jsonl:3:1: expected a JSON object" in records[1]["error"]
    assert "items.jsonl:4:1: input 'n': expected an integer" in records[2]["error"]  # JSON keeps its types
    assert "items.jsonl:5:2: invalid JSON" in records[3]["error"]
    assert "missing required input 'question'" in records[4]["error"]
    assert records[4]["inputs"] == {"n": 2}
    r = run_cli("batch", str(flow), "--inputs", str(data), "-i", "nn=3", env=env)
    assert r.returncode == 2 and "did you mean 'n'" in r.stderr


def test_rate_limit_spaces_requests_as_the_server_measures(flow, env, llm, tmp_path) -> None:
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}"} for i in range(16)])
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--concurrency", "8", "--rate-limit", "600rpm",
                env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    times = sorted(req.received_at for req in llm.chat_requests)
    assert len(times) == 16
    # 600 per minute is one every 0.1 s: never more than 10 (+1 for jitter at the edges) in any second,
    # although 8 workers were ready at once.
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 11
    assert times[-1] - times[0] >= 15 * 0.1 * 0.9


def test_rate_limit_syntax(flow, env, tmp_path) -> None:
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": "q"}])
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--rate-limit", "fast", env=env)
    assert r.returncode == 2 and "expected a positive number of rpm or tpm" in r.stderr


def test_tokens_per_minute_wait_for_the_window(monkeypatch) -> None:
    from flowrunner.llm import limits

    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(limits.asyncio, "sleep", sleep)
    assert limits.Limits.parse(("500rpm, 1000tpm",)) == limits.Limits(rpm=500, tpm=1000)
    limiter = limits.RateLimiter(limits.Limits(tpm=1000), clock=lambda: now[0])

    async def go() -> list[float]:
        starts = []
        for tokens in (600, 500, 10):
            await limiter.before_request()
            starts.append(now[0])
            limiter.charge(tokens)
        return starts

    starts = asyncio.run(go())
    assert starts[0] == 0 and starts[1] == 0  # 600 < 1000: the second may go at once
    assert starts[2] >= 60  # 1100 in the window: wait until the first 600 leave it


def test_fail_fast_stops_at_the_first_failure(flow, env, llm, tmp_path) -> None:
    llm.responder = lambda request: Reply(status=400, error="bad") if question(request) == "q2" else None
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}"} for i in range(20)])
    out = tmp_path / "results.jsonl"
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out), "--concurrency", "1",
                "--fail-fast", env=env)
    assert r.returncode == 1
    assert [(rec["index"], rec["status"]) for rec in read_json_lines(out)] == [(0, "ok"), (1, "ok"), (2, "failed")]
    assert len(llm.chat_requests) == 3


def test_progress_bar_and_summary_on_a_terminal(flow, env, llm, tmp_path) -> None:
    import pty

    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}"} for i in range(5)])
    out = tmp_path / "results.jsonl"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "batch", str(flow), "--inputs", str(inputs),
                             "--output", str(out)], cwd=ROOT, env={**os.environ, **env, "COLUMNS": "120"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the pty closes when the process exits
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=30) == 0
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert "5/5" in text and "items/s" in text
    assert "done: 5 items, 5 ok, 0 failed" in text and f"results in {out}" in text
    assert len(read_json_lines(out)) == 5


def test_a_setup_error_stops_the_batch_instead_of_failing_every_item(write_flow, tmp_path) -> None:
    flow = write_flow(FLOW.replace("api_key: sk-test-key", "api_key: \"${env.BATCH_TEST_KEY}\""))
    inputs = jsonl(tmp_path / "items.jsonl", [{"question": f"q{i}"} for i in range(50)])
    out = tmp_path / "results.jsonl"
    r = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(out))  # no key, no base_url
    assert r.returncode == 2
    assert "environment variable BATCH_TEST_KEY is not set" in r.stderr and "export BATCH_TEST_KEY" in r.stderr
    assert out.read_text() == ""  # nothing recorded: a --resume after the fix runs them all
