"""`flowrunner run` through the real command line: outputs, events, sinks, exit codes 0/1/2/130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PLUGINS, ROOT, run_cli
from tests.support.jsonlines import events

SET_FLOW = """
version: 1
name: greet
inputs:
  name: {type: string}
  times: {type: integer, default: 2}
steps:
  - id: greet
    type: set
    values:
      greeting: "Hello, ${inputs.name}!"
      count: ${inputs.times}
outputs:
  greeting: ${greeting}
  count: ${steps.greet.count}
"""


def test_set_flow_prints_outputs(write_flow) -> None:
    out = run_cli("run", str(write_flow(SET_FLOW)), "-i", "name=Ada", "-i", "times=3")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "greeting: Hello, Ada!\ncount: 3\n"


def test_output_json(write_flow) -> None:
    out = run_cli("run", str(write_flow(SET_FLOW)), "-i", "name=Ada", "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"greeting": "Hello, Ada!", "count": 2}


def test_inputs_file_and_override(write_flow, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"name": "Bob", "times": 9}')
    out = run_cli("run", str(write_flow(SET_FLOW)), "--inputs-file", str(tmp_path / "in.json"), "-i", "times=4",
                  "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"greeting": "Hello, Bob!", "count": 4}


def test_jsonl_sink_prints_the_event_sequence(write_flow) -> None:
    out = run_cli("run", str(write_flow(SET_FLOW)), "-i", "name=Ada", "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    seq = events(out.stdout)
    assert [e["event"] for e in seq] == ["run_started", "step_started", "step_finished", "run_finished"]
    assert seq[0]["inputs"] == {"name": "Ada", "times": 2}
    assert seq[2]["outputs"] == {"greeting": "Hello, Ada!", "count": 2} and seq[2]["status"] == "ok"
    assert seq[3]["status"] == "ok" and seq[3]["outputs"]["greeting"] == "Hello, Ada!"
    assert seq[0]["run_id"] == seq[3]["run_id"]


def test_exit_2_for_a_wrong_flow_or_command_line(write_flow) -> None:
    missing = run_cli("run", str(write_flow(SET_FLOW)))
    assert missing.returncode == 2
    assert "Error: inputs.name: missing required input 'name'" in missing.stderr
    assert "hint: pass it with -i name=..." in missing.stderr
    bad_type = run_cli("run", str(write_flow(SET_FLOW)), "-i", "name=x", "-i", "times=many")
    assert bad_type.returncode == 2 and "input 'times': expected an integer, got 'many'" in bad_type.stderr
    broken = run_cli("run", str(write_flow("version: 1\nname: x\nsteps:\n  - id: a\n    type: sett\n")))
    assert broken.returncode == 2 and "flow.yaml:5:11: steps[0].type: 'sett' is not a step type" in broken.stderr
    bad_sink = run_cli("run", str(write_flow(SET_FLOW)), "-i", "name=x", "--sink", "kafka:topic")
    assert bad_sink.returncode == 2 and "is not a sink" in bad_sink.stderr
    no_file = run_cli("run", "nope.yaml")
    assert no_file.returncode == 2 and "Error: nope.yaml: no such file" in no_file.stderr
    for out in (missing, bad_type, broken, bad_sink, no_file):
        assert "Traceback" not in out.stderr


def test_exit_1_when_a_step_fails_and_run_on_failure_still_runs(write_flow, tmp_path: Path) -> None:
    flow = write_flow("""
version: 1
name: failing
inputs:
  items: {type: array, default: [one]}
steps:
  - id: pick
    type: set
    values: {second: "${inputs.items[1]}"}
  - id: skipped
    type: set
    values: {x: 1}
  - id: cleanup
    type: set
    run_on_failure: true
    values: {cleaned: "yes"}
""")
    out = run_cli("run", str(flow), "--sink", f"jsonl:{tmp_path / 'ev.jsonl'}")
    assert out.returncode == 1
    assert "Error: " in out.stderr and ":7:5: step 'pick' (set) failed: ${inputs.items[1]}: inputs.items has 1 item(s), no [1]" in out.stderr
    seq = events((tmp_path / "ev.jsonl").read_text())
    finished = {e["step"]: e["status"] for e in seq if e["event"] == "step_finished"}
    assert finished == {"pick": "failed", "skipped": "skipped", "cleanup": "ok"}
    assert seq[-1]["event"] == "run_finished" and seq[-1]["status"] == "failed"
    assert "Traceback" not in out.stderr


def test_stdout_sink_streams_text_and_partial_text_reaches_run_on_failure(write_flow, tmp_path: Path) -> None:
    flow = write_flow("""
version: 1
name: partial
steps:
  - id: answer
    type: test_type
    words: ["Hello", " there", " friend"]
    fail_after: 2
  - id: save
    type: set
    run_on_failure: true
    values: {saved: "${typed}", was_partial: "${steps.answer.partial}"}
outputs:
  saved: ${saved}
""")
    out = run_cli("run", str(flow), "--sink", "stdout", plugins=True)
    assert out.returncode == 1
    assert out.stdout == "Hello there\n"
    assert "step 'answer' (test_type) failed: the stream broke" in out.stderr
    out = run_cli("run", str(flow), "--sink", "jsonl:-", plugins=True)
    save = [e for e in events(out.stdout) if e["event"] == "step_finished" and e["step"] == "save"][0]
    assert save["outputs"] == {"saved": "Hello there", "was_partial": True}


def test_file_sink_writes_the_text(write_flow, tmp_path: Path) -> None:
    flow = write_flow("version: 1\nname: t\nsteps:\n  - {id: a, type: test_type, words: [one, ' two']}\n")
    out = run_cli("run", str(flow), "--sink", f"file:{tmp_path / 'answer.txt'}", plugins=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "answer.txt").read_text() == "one two"
    assert out.stdout == "one two\n"  # the outputs, since nothing streamed to stdout


def test_timeout_and_retry(write_flow, tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    flow = write_flow(f"""
version: 1
name: retry
steps:
  - id: flaky
    type: test_type
    words: [ok]
    fail_times: 2
    counter_file: {counter}
    retry: {{attempts: 3, backoff: 0.01}}
  - id: slow
    type: test_type
    words: [a, b, c]
    delay: 5
    timeout: 0.3
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", plugins=True)
    assert counter.read_text() == "3"
    seq = events(out.stdout)
    assert {e["step"]: e["status"] for e in seq if e["event"] == "step_finished"} == {"flaky": "ok", "slow": "failed"}
    assert [e["attempt"] for e in seq if e["event"] == "step_retrying"] == [1, 2]
    assert out.returncode == 1
    assert "step 'slow' (test_type) failed: timed out after 0.3 s" in out.stderr


def test_no_retry_after_text_was_streamed(write_flow, tmp_path: Path) -> None:
    flow = write_flow("""
version: 1
name: no-dup
steps:
  - id: s
    type: test_type
    words: [a, b, c]
    fail_after: 1
    retryable: true
    retry: {attempts: 3, backoff: 0}
""")
    out = run_cli("run", str(flow), plugins=True)
    assert out.returncode == 1
    assert out.stdout == "a\n"  # retrying would have printed "a" twice


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated.")])
def test_ctrl_c_and_sigterm_stop_cleanly(write_flow, tmp_path: Path, sig: int, code: int, said: str) -> None:
    flow = write_flow("version: 1\nname: slow\nsteps:\n  - {id: s, type: test_type, words: [a, b, c, d], delay: 0.5}\n")
    env = {**os.environ, "FLOWRUNNER_PLUGINS": PLUGINS, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "run", str(flow), "--sink",
                             f"jsonl:{tmp_path / 'ev.jsonl'}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until the step is running
        if (tmp_path / "ev.jsonl").exists() and "step_started" in (tmp_path / "ev.jsonl").read_text():
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == code, stderr
    assert said in stderr and "Traceback" not in stderr
    seen = events((tmp_path / "ev.jsonl").read_text())
    last = seen[-1]  # the engine's own run_finished: its id, status, duration and the outputs so far
    assert last["event"] == "run_finished" and last["status"] == "interrupted"
    assert last["run_id"] == seen[0]["run_id"] and last["duration"] > 0 and "outputs" in last


@pytest.mark.parametrize("canary", ["sk-canary-7f3a9c1e5b", 'sk-ab"cd\\ef-12345\ttab'])
def test_secrets_are_redacted_everywhere(write_flow, tmp_path: Path, canary: str) -> None:
    flow = write_flow("""
version: 1
name: leak
connections:
  llm: {type: openai, api_key: "${env.CANARY_KEY}"}
steps:
  - {id: leak, type: test_leak, connection: llm}
""")
    for fmt in ("json", "console"):
        out = run_cli("--debug", "--log-format", fmt, "run", str(flow), "--sink", "jsonl:-",
                      env={"CANARY_KEY": canary}, plugins=True)
        assert out.returncode == 1
        both = out.stdout + out.stderr
        assert canary not in both and json.dumps(canary)[1:-1] not in both  # raw, or JSON-escaped
        assert "401 unauthorized for key ***" in out.stderr and "driver said" in out.stderr
        assert "warning mentioning ***" in out.stdout
