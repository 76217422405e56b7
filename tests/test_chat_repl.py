"""`flowrunner chat`: one conversation over many lines; Ctrl-C stops an answer (and its upstream
stream), not the conversation; end of input exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT, run_cli
from tests.support.openai_script import Reply

LLM = 'llm: {type: openai, api_key: sk-test-key, base_url: "${env.TEST_OPENAI_BASE_URL}", max_retries: 0}'

STORE_FLOW = f"""
version: 1
name: remembering
inputs:
  question: {{type: string}}
  conversation_id: {{type: string, default: shared}}
connections:
  {LLM}
  history: {{type: sqlite, path: history.sqlite3}}
steps:
  - {{id: recall, type: history_load, connection: history, conversation_id: "${{inputs.conversation_id}}", create: true}}
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${{inputs.question}}
    history: ${{history}}
  - id: remember
    type: history_save
    connection: history
    conversation_id: ${{inputs.conversation_id}}
    user_prompt: ${{inputs.question}}
    response: ${{response}}
    create: true
"""

INPUT_FLOW = f"""
version: 1
name: stateless
inputs:
  question: {{type: string}}
  history: {{type: array, default: []}}
connections:
  {LLM}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${{inputs.question}}
    history: ${{inputs.history}}
"""


def sent(request) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request.json["messages"]]


def test_the_flows_store_keeps_the_conversation(llm, write_flow) -> None:
    flow = write_flow(STORE_FLOW)
    llm.script(Reply(text="Paris."), Reply(text="About 2 million."))
    env = {"TEST_OPENAI_BASE_URL": llm.base_url}
    r = run_cli("chat", str(flow), "--conversation", "trip", stdin="Capital of France?\n\nHow many people live there?\n",
                env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Paris.\nAbout 2 million.\n"
    assert sent(llm.chat_requests[1]) == [("user", "Capital of France?"), ("assistant", "Paris."),
                                          ("user", "How many people live there?")]
    llm.script(Reply(text="Yes."))  # a new session continues the same conversation from the store
    r = run_cli("chat", str(flow), "--conversation", "trip", stdin="Sure?\n", env=env)
    assert r.returncode == 0 and len(sent(llm.chat_requests[2])) == 5
    r = run_cli("chat", str(flow), stdin="Hello?\n", env=env)  # no --conversation: a new one, not 'shared'
    assert r.returncode == 0 and sent(llm.chat_requests[3]) == [("user", "Hello?")]


def test_a_flow_without_a_store_gets_the_session_turns_as_its_history_input(llm, write_flow) -> None:
    flow = write_flow(INPUT_FLOW)
    llm.script(Reply(text="One."), Reply(text="Two."))
    r = run_cli("chat", str(flow), stdin="first\nsecond\n", env={"TEST_OPENAI_BASE_URL": llm.base_url})
    assert r.returncode == 0, r.stderr
    assert sent(llm.chat_requests[1]) == [("user", "first"), ("assistant", "One."), ("user", "second")]


def test_a_failed_turn_is_reported_and_the_session_goes_on(llm, write_flow) -> None:
    flow = write_flow(INPUT_FLOW)
    llm.script(Reply(status=400, error="no such model"), Reply(text="Fine."))
    r = run_cli("chat", str(flow), stdin="first\nsecond\n", env={"TEST_OPENAI_BASE_URL": llm.base_url})
    assert r.returncode == 1  # an answer failed (the session went on)
    assert "step 'answer' (chat_completion) failed" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == "Fine.\n"
    assert sent(llm.chat_requests[1]) == [("user", "second")]  # the failed turn is not history


def test_ctrl_c_stops_the_answer_not_the_conversation(llm, write_flow) -> None:
    flow = write_flow(INPUT_FLOW)
    llm.script(Reply(text=["Once", " upon", " a", " time"], stall_after=1, stall=30), Reply(text="Short."))
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "chat", str(flow)], cwd=ROOT,
                            env={**os.environ, "TEST_OPENAI_BASE_URL": llm.base_url}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(b) for b in iter(lambda: os.read(proc.stdout.fileno(), 1024), b"")],
                              daemon=True)
    reader.start()
    try:
        proc.stdin.write(b"tell me a story\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while b"Once" not in out:  # the first words arrived; the model now stalls
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert llm.wait_for_disconnect(timeout=10)  # the upstream stream was closed
        proc.stdin.write(b"and now?\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    reader.join(timeout=5)
    stderr = proc.stderr.read().decode()
    assert "(stopped)" in stderr and "Traceback" not in stderr
    assert bytes(out).decode().endswith("Short.\n")
    assert sent(llm.chat_requests[1]) == [("user", "and now?")]  # a stopped answer is not history


def test_a_flow_with_no_input_for_the_message_is_a_clear_error(write_flow) -> None:
    flow = write_flow("version: 1\nname: odd\ninputs:\n  a: {type: string}\n  b: {type: string}\n"
                      "steps:\n  - {id: s, type: set, values: {x: '${inputs.a}'}}\n")
    r = run_cli("chat", str(flow), stdin="hi\n")
    assert r.returncode == 2 and "no input for the user's message" in r.stderr and "--message-input" in r.stderr
    r = run_cli("chat", str(flow), "--message-input", "b", stdin="hi\n")
    assert r.returncode == 2 and "missing required input 'a'" in r.stderr  # before any message is read
    r = run_cli("chat", str(flow), "--message-input", "b", "-i", "a=x", stdin="hi\n")
    assert r.returncode == 0 and r.stdout == "x\n"  # a flow without a chat step: its outputs are the answer
