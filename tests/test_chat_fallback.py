"""The chat step's `fallback:` models, through the real CLI against two real OpenAI-protocol servers:
which failures fall back and which do not, what the run says about it, and how --record and
--replay treat a fallback's answer."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.fixtures import OpenAIServer, Reply
from tests.support.jsonlines import events

BACKUP_TEXT = "The backup model answers this one."
BACKUP_KEY = "sk-backup-0a1b2c3d4e5f6a7b8c9d"

FLOW = """
version: 1
name: fallbacks
inputs:
  question: {{type: string}}
connections:
  llm: {{type: {primary_type}, {primary}, max_retries: {retries}{conn_extra}}}
  backup: {{type: openai, api_key: "${{env.BACKUP_KEY}}", base_url: "${{env.BACKUP_URL}}", max_retries: 0}}
  dead: {{type: openai, api_key: sk-dead, base_url: "${{env.DEAD_URL}}", max_retries: 0}}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    {model}
    user_prompt: ${{inputs.question}}
    stream: {stream}
    fallback:
{fallbacks}
"""
OPENAI = 'api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}"'
AZURE = 'endpoint: "${env.AZ_ENDPOINT}", api_key: "${env.AZ_KEY}"'
TO_BACKUP = "      - {connection: backup, model: gpt-4o-mini}"
TO_DEAD = "      - {connection: dead, model: gpt-4o-mini}"


@pytest.fixture(scope="module")
def backup_server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as server:
        yield server


@pytest.fixture
def backup(backup_server: OpenAIServer) -> OpenAIServer:
    backup_server.reset()
    backup_server.default_reply = Reply(text=BACKUP_TEXT)
    return backup_server


def closed_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fallback_run(llm, backup, write_flow):
    """Runs the flow: the step's own model on `llm`, then the `fallbacks` lines, in order."""

    def run(*args: str, retries: int = 0, fallbacks: tuple[str, ...] = (TO_BACKUP,), azure: bool = False,
            env: dict[str, str] | None = None, unset: tuple[str, ...] = (), conn_extra: str = "",
            stream: bool = True):
        flow = write_flow(FLOW.format(primary_type="azure_openai" if azure else "openai",
                                      primary=AZURE if azure else OPENAI, retries=retries,
                                      model="deployment: chat-eu" if azure else "model: gpt-4o",
                                      fallbacks="\n".join(fallbacks), conn_extra=conn_extra,
                                      stream=str(stream).lower()))
        full_env = {"OPENAI_API_KEY": "sk-primary", "OPENAI_BASE_URL": llm.base_url, "AZ_KEY": "az-key-1234",
                    "AZ_ENDPOINT": llm.azure_endpoint, "BACKUP_KEY": BACKUP_KEY, "BACKUP_URL": backup.base_url,
                    "DEAD_URL": f"http://127.0.0.1:{closed_port()}/v1", **(env or {})}
        for name in unset:
            del full_env[name]
        return run_cli("run", str(flow), "-i", "question=Which model answers?", *args, env=full_env)

    return run


def step_finished(out) -> dict:
    return next(e for e in events(out.stdout) if e["event"] == "step_finished" and e["step"] == "answer")


def test_primary_503_after_its_retries_then_the_backup_answers(llm, backup, fallback_run) -> None:
    llm.script(*[Reply(status=503, retry_after_ms=1)] * 3)
    out = fallback_run(retries=2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(BACKUP_TEXT) == 1
    assert [r.retry_count for r in llm.chat_requests] == [0, 1, 2]  # its own retries first, then the fallback
    assert [r.body["model"] for r in backup.chat_requests] == ["gpt-4o-mini"]
    assert backup.chat_requests[0].headers["authorization"] == f"Bearer {BACKUP_KEY}"
    assert "primary llm/gpt-4o failed: server error (503) after 2 retries: The engine is currently overloaded" \
        in out.stderr
    assert "answered by fallback 1 (backup/gpt-4o-mini)" in out.stderr


def test_the_event_and_the_outputs_say_which_model_answered(llm, backup, fallback_run) -> None:
    llm.script(Reply(status=503))
    out = fallback_run("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    found = events(out.stdout)
    (fallback,) = [e for e in found if e["event"] == "fallback"]
    assert fallback["step"] == "answer" and fallback["fallback"] == 1
    assert (fallback["connection"], fallback["model"]) == ("backup", "gpt-4o-mini")
    assert [(f["connection"], f["model"]) for f in fallback["failed"]] == [("llm", "gpt-4o")]
    assert fallback["failed"][0]["error"].startswith("server error (503)")
    assert "".join(e["text"] for e in found if e["event"] == "text") == BACKUP_TEXT
    outputs = step_finished(out)["outputs"]
    assert (outputs["connection"], outputs["model"], outputs["text"]) == ("backup", "gpt-4o-mini", BACKUP_TEXT)


def test_without_a_failure_the_primary_answers_and_says_so(llm, backup, fallback_run) -> None:
    out = fallback_run("--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    outputs = step_finished(out)["outputs"]
    assert (outputs["connection"], outputs["model"]) == ("llm", "gpt-4o")
    assert not backup.chat_requests and not [e for e in events(out.stdout) if e["event"] == "fallback"]
    assert "answered by" not in out.stderr


def test_a_model_the_primary_does_not_have_falls_back(llm, backup, fallback_run) -> None:
    llm.script(Reply(status=404))
    out = fallback_run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(BACKUP_TEXT) == 1
    assert "primary llm/gpt-4o failed: not found (404): The model does not exist" in out.stderr


def test_a_primary_that_refuses_connections_falls_back(llm, backup, fallback_run) -> None:
    out = fallback_run(env={"OPENAI_BASE_URL": f"http://127.0.0.1:{closed_port()}/v1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(BACKUP_TEXT) == 1
    assert "primary llm/gpt-4o failed: cannot reach http://127.0.0.1:" in out.stderr


def test_azure_first_with_a_rejected_key_falls_back_to_openai(llm, backup, fallback_run) -> None:
    llm.require_key = "the-current-key"  # the Azure key was rotated: 401
    out = fallback_run("--sink", "jsonl:-", azure=True)
    assert out.returncode == 0, out.stderr
    assert [r.deployment for r in llm.chat_requests] == ["chat-eu"]
    warning = next(e["message"] for e in events(out.stdout) if e["event"] == "warning")
    assert warning.startswith("primary llm/chat-eu failed: authentication failed (401)")
    assert step_finished(out)["outputs"]["connection"] == "backup"


def test_a_primary_that_goes_silent_before_its_first_delta_falls_back(llm, backup, fallback_run) -> None:
    llm.script(Reply(text="never shown", stall_after=0, stall=30))
    out = fallback_run(conn_extra=", timeout: 0.5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(BACKUP_TEXT) == 1 and "never" not in out.stdout
    assert "primary llm/gpt-4o failed: the stream stalled: no data for 0.5 s" in out.stderr


def test_without_streaming_a_failure_falls_back_too(llm, backup, fallback_run) -> None:
    llm.script(Reply(status=503))
    out = fallback_run("--sink", "jsonl:-", stream=False)
    assert out.returncode == 0, out.stderr
    assert [r.body.get("stream") for r in llm.chat_requests + backup.chat_requests] == [False, False]
    outputs = step_finished(out)["outputs"]
    assert (outputs["connection"], outputs["text"]) == ("backup", BACKUP_TEXT)


def test_a_stream_that_broke_before_its_first_delta_falls_back(llm, backup, fallback_run) -> None:
    llm.script(Reply(text="never shown", error_after=0))
    out = fallback_run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(BACKUP_TEXT) == 1 and "never" not in out.stdout
    assert "primary llm/gpt-4o failed: the server reported an error mid-stream" in out.stderr


def test_a_primary_that_breaks_after_text_does_not_fall_back(llm, backup, fallback_run) -> None:
    llm.script(Reply(text="The primary began to answer and then", disconnect_after=3))
    out = fallback_run()
    assert out.returncode == 1
    assert out.stdout.startswith("The primary began") and BACKUP_TEXT not in out.stdout
    assert not backup.chat_requests  # the answer would have printed twice
    assert "the connection broke mid-stream" in out.stderr and "answered by" not in out.stderr


def test_a_rejected_request_does_not_fall_back(llm, backup, fallback_run) -> None:
    llm.script(Reply(status=400, error="Invalid value for 'temperature'."))
    out = fallback_run()
    assert out.returncode == 1
    assert not backup.chat_requests
    assert "the request was rejected (400): Invalid value for 'temperature'." in out.stderr
    assert "is not sent to the fallbacks" in out.stderr


def test_when_every_model_fails_the_error_lists_each_one(llm, backup, fallback_run) -> None:
    llm.script(Reply(status=503))
    backup.script(Reply(status=500, error=f"upstream refused key {BACKUP_KEY}"))  # a server that echoes the key
    out = fallback_run("--sink", "jsonl:-", fallbacks=(TO_BACKUP, TO_DEAD))
    assert out.returncode == 1
    finished = next(e for e in events(out.stdout) if e["event"] == "run_finished")
    lines = out.stderr[out.stderr.index("\nError: ") + 1:].splitlines()
    assert lines[0].endswith("step 'answer' (chat_completion) failed: no model answered (3 tried):")
    assert lines[1].startswith("  primary llm/gpt-4o: server error (503): The engine is currently overloaded")
    assert lines[2].startswith("  fallback 1 backup/gpt-4o-mini: server error (500): upstream refused key ")
    assert lines[3].startswith("  fallback 2 dead/gpt-4o-mini: cannot reach http://127.0.0.1:")
    assert "no model answered (3 tried)" in finished["error"]
    assert BACKUP_KEY not in out.stderr and BACKUP_KEY not in out.stdout
    assert not [e for e in events(out.stdout) if e["event"] == "fallback"]


def test_a_fallback_connection_with_an_unset_variable_stops_the_run_before_any_request(llm, backup,
                                                                                     fallback_run) -> None:
    out = fallback_run(unset=("BACKUP_KEY", "BACKUP_URL"))
    assert out.returncode == 2
    assert "connection 'backup' needs an API key: environment variable BACKUP_KEY is not set" in out.stderr
    assert not llm.chat_requests and not backup.chat_requests


def test_a_recording_holds_the_answer_that_came_and_replays_it(llm, backup, fallback_run, tmp_path: Path) -> None:
    tape = tmp_path / "tape.jsonl"
    llm.script(Reply(status=503))
    live = fallback_run("--record", str(tape))
    assert live.returncode == 0, live.stderr
    records = [json.loads(line) for line in tape.read_text().splitlines()]
    assert [r["request"]["model"] for r in records] == ["gpt-4o-mini"]  # the request that answered
    asked = len(llm.chat_requests), len(backup.chat_requests)
    replay = fallback_run("--replay", str(tape), "--sink", "jsonl:-")
    assert replay.returncode == 0, replay.stderr
    assert (len(llm.chat_requests), len(backup.chat_requests)) == asked  # no model was called
    assert "".join(e["text"] for e in events(replay.stdout) if e["event"] == "text") == BACKUP_TEXT
    assert step_finished(replay)["outputs"]["connection"] == "backup"
    assert "primary llm/gpt-4o failed: not in the recording" in replay.stderr
    assert "answered by fallback 1 (backup/gpt-4o-mini)" in replay.stderr


def test_a_stream_that_broke_when_recorded_breaks_again_in_the_replay(llm, backup, fallback_run,
                                                                      tmp_path: Path) -> None:
    tape = tmp_path / "tape.jsonl"
    llm.script(Reply(text="never shown", error_after=0))
    assert fallback_run("--record", str(tape)).returncode == 0
    assert [json.loads(line)["request"]["model"] for line in tape.read_text().splitlines()] == ["gpt-4o", "gpt-4o-mini"]
    replay = fallback_run("--replay", str(tape))
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.count(BACKUP_TEXT) == 1
    assert "primary llm/gpt-4o failed: the server reported an error mid-stream" in replay.stderr


BAD_FALLBACKS = """\
version: 1
name: bad-fallbacks
inputs:
  backup: {type: string, default: llm}
connections:
  llm: {type: openai, api_key: sk-x}
  az: {type: azure_openai, endpoint: "https://example.openai.azure.com", api_key: k}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o
    user_prompt: hi
    fallback:
      - {connection: bakup, model: gpt-4o-mini}
      - {connection: llm, deployment: gpt-4o-mini}
      - {connection: az, model: gpt-4o}
      - {connection: llm}
      - {connection: "${inputs.backup}", model: gpt-4o-mini}
"""


def where(text: str, needle: str, part: str = "") -> str:
    """`line:col` of `needle` (of `part` inside it), counted from 1, as the errors give it."""
    before = text[:text.index(needle) + needle.index(part)]
    return f"{before.count(chr(10)) + 1}:{len(before) - before.rfind(chr(10))}"


def test_validate_locates_each_bad_fallback(write_flow) -> None:
    flow = write_flow(BAD_FALLBACKS)
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert f"{flow}:{where(BAD_FALLBACKS, 'bakup')}: steps[0].fallback[0].connection: unknown connection 'bakup'" \
        in text
    assert where(BAD_FALLBACKS, "bakup") == "15:22"  # where() itself counts as the errors do
    assert "did you mean 'az'?" in text or "declared: az, llm" in text
    assert f"{flow}:{where(BAD_FALLBACKS, 'deployment: gpt-4o-mini', 'gpt')}: steps[0].fallback[1].deployment: `deployment` is for " \
           "azure_openai connections; 'llm' is openai" in text
    assert f"{flow}:{where(BAD_FALLBACKS, 'az, model: gpt-4o', 'gpt')}: steps[0].fallback[2].model: `model` is for openai " \
           "connections; 'az' is azure_openai" in text
    assert f"{flow}:{where(BAD_FALLBACKS, '{connection: llm}')}: steps[0].fallback[3]: fallback to openai " \
           "connection 'llm' needs `model:`" in text
    reference = where(BAD_FALLBACKS, '"${inputs.backup}')
    assert f"{flow}:{reference}: steps[0].fallback[4].connection: a fallback's " \
           "connection is a connection's name, not a ${...} reference" in text
    assert "5 problem(s)" in text


def test_validate_locates_an_unknown_key_in_a_fallback(write_flow) -> None:
    bad = BAD_FALLBACKS.replace("{connection: llm}", "{connection: llm, modle: gpt-4o}")
    flow = write_flow(bad)
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    assert f"{flow}:{where(bad, 'modle')}: steps[0].fallback[3].modle: unknown property 'modle'" in out.stdout


def test_the_readme_example_runs_as_printed(llm, backup, write_flow) -> None:
    """README "Fallbacks": Azure OpenAI first, OpenAI second (here the backup server, through the SDK's
    own OPENAI_BASE_URL), the local Ollama never reached."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("#### Fallbacks"):]
    example = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml\n") + 8)]
    flow = write_flow("version: 1\nname: readme-fallbacks\ninputs:\n  question: {type: string}\n" + example)
    assert run_cli("validate", str(flow)).returncode == 0
    llm.script(*[Reply(status=503, retry_after_ms=1)] * 3)  # the connection's default max_retries: 2
    out = run_cli("run", str(flow), "-i", "question=Which model answers?",
                  env={"AZURE_OPENAI_ENDPOINT": llm.azure_endpoint, "AZURE_OPENAI_API_KEY": "az-key",
                       "OPENAI_API_KEY": BACKUP_KEY, "OPENAI_BASE_URL": backup.base_url})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(BACKUP_TEXT) == 1
    assert [r.deployment for r in llm.chat_requests] == ["gpt-4o"] * 3
    assert [r.body["model"] for r in backup.chat_requests] == ["gpt-4o"]
    assert "primary azure/gpt-4o failed: server error (503) after 2 retries" in out.stderr
    assert "answered by fallback 1 (openai/gpt-4o)" in out.stderr


def test_serve_answers_from_the_fallback(llm, backup, tmp_path: Path) -> None:
    from tests.test_serve import Server

    flow = tmp_path / "served.yaml"
    flow.write_text(f"""
version: 1
name: served-fallbacks
inputs:
  question: {{type: string}}
connections:
  llm: {{type: openai, api_key: "${{env.OPENAI_API_KEY}}", base_url: "${{env.OPENAI_BASE_URL}}", max_retries: 0}}
  backup: {{type: openai, api_key: {BACKUP_KEY}, base_url: "{backup.base_url}", max_retries: 0}}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o
    user_prompt: ${{inputs.question}}
    fallback:
{TO_BACKUP}
""", encoding="utf-8")
    server = Server(flow, llm.base_url)
    try:
        llm.script(Reply(status=503))
        stream = server.client().chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Which model answers?"}], stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == BACKUP_TEXT
        assert len(llm.chat_requests) == 1 and len(backup.chat_requests) == 1
    finally:
        server.stop()
    assert BACKUP_KEY not in server.stderr
