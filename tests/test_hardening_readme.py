"""Issue 17, items 1-3: a fresh clone and the README, as a new user meets them.

1. The repository carries the test data its tests need: a copy with nothing beside it finds its
   recorded streams, and no test, benchmark or make target reads a folder next to the repository.
2. Every block of the README's "Your first ten minutes" runs as printed (the shell blocks with the
   environment activated as "Set-up" says, the cron lines as cron runs them, the CI workflow's
   commands, the Python client against `flowrunner serve`), in a copy of the repository with a fresh
   data directory and the OpenAI-protocol test server as the model. A `--record`ed run replays although
   the recording run saved its turn to the history it replays on.
3. Nothing those commands write shows up in `git status` of the copy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from datetime import date
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import Reply
from tests.test_quickstart import fresh_copy, git_changes, git_snapshot

# Built from pieces, so that this file does not match itself.
BESIDE = re.compile("|".join([r"\.\./" + "shared", r"parents\[2\]\.parent", "/work/" + "shared",
                              "FLOWRUNNER_" + "SHARED"]))


def listed_files() -> list[str]:
    """What a clone holds (tracked and new files, not ignored), as `fresh_copy` copies it."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return [name for name in out.split("\0") if name and (ROOT / name).is_file()]


# --- 1. nothing beside the repository -------------------------------------------------------------

def test_no_test_benchmark_or_make_target_reads_beside_the_repository() -> None:
    names = [n for n in listed_files() if n.startswith(("tests/", "bench/", ".ci/")) or n == "Makefile"]
    assert "tests/support/openai_script.py" in names and "Makefile" in names
    offenders = [f"{name}:{n}: {line.strip()}"
                 for name in names if (ROOT / name).resolve() != Path(__file__).resolve()
                 for n, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
                 if BESIDE.search(line)]
    assert not offenders, "reads a folder beside the repository:\n" + "\n".join(offenders)


def test_a_copy_with_nothing_beside_it_runs_the_tests_that_replay_recorded_streams(tmp_path) -> None:
    alone = tmp_path / "alone"  # holds the repository and nothing else
    repo = fresh_copy(alone / "fr")
    assert sorted(p.name for p in alone.iterdir()) == ["fr"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWRUNNER_", "OPENAI_"))}
    where = subprocess.run([sys.executable, "-c", "from tests.support.openai_script import RECORDINGS as r; "
                            "print(r); print(*sorted(p.name for p in r.glob('*.sse')))"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines() == [str(repo / "tests/data/recorded-streams"),
                                         "c6aa7e397b71.sse e2aad469b71d.sse f82268f2fefd.sse"]
    # The tests that failed in a fresh clone (they replay the recorded streams), run in the copy.
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_openai_server.py", "tests/test_chat_completion.py",
                          "-k", "recording or recorded"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 7 and "skipped" not in out.stdout, out.stdout[-1000:]


# --- 2. a recorded run replays on the history it saved ---------------------------------------------

REMEMBERING = """
version: 1
name: remembering
inputs:
  question: {type: string}
connections:
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}", max_retries: 0}
steps:
  - {id: recall, type: history_load, conversation_id: c1, create: true, result: history}
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    system_prompt: Remember.
    user_prompt: ${inputs.question}
    history: ${history}
    result: response
  - {id: remember, type: history_save, conversation_id: c1, user_prompt: "${inputs.question}",
     response: "${response}", create: true}
"""


def test_a_recorded_run_replays_although_it_saved_its_turn(write_flow, llm, tmp_path) -> None:
    flow, tape = write_flow(REMEMBERING), tmp_path / "tape.jsonl"
    env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "sk-test", "FLOWRUNNER_DATA_DIR": str(tmp_path / "data")}
    llm.script(Reply(text=["Noted", "."]))
    live = run_cli("run", str(flow), "-i", "question=My name is Ada.", "--record", str(tape), env=env)
    assert live.returncode == 0, live.stderr
    records = [json.loads(line) for line in tape.read_text().splitlines()]
    assert [(r["step"], r.get("kind", "chat")) for r in records] == [("recall", "history"), ("answer", "chat")]
    assert records[0]["messages"] == [] and records[0]["request"]["conversation_id"] == "c1"
    # The history now holds the recorded turn; the replay still sends the recorded request, twice.
    offline = {**env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": ""}
    for _ in range(2):
        replay = run_cli("run", str(flow), "-i", "question=My name is Ada.", "--replay", str(tape), env=offline)
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout == live.stdout == "Noted.\n"
    # A later live turn does see the saved one: the store itself was not bypassed.
    llm.script(Reply(text="Ada."))
    again = run_cli("run", str(flow), "-i", "question=What is my name?", env=env)
    assert again.returncode == 0, again.stderr
    assert [m["content"] for m in llm.chat_requests[-1].json["messages"]] == [
        "Remember.", "My name is Ada.", "Noted.", "What is my name?"]


def test_a_replay_whose_history_grew_says_so(write_flow, llm, tmp_path) -> None:
    """A recording without history loads (as flowrunner made them before) reads the store: after the
    recording run saved its turn, the mismatch names the history, not the flow."""
    flow, tape = write_flow(REMEMBERING), tmp_path / "tape.jsonl"
    env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "sk-test", "FLOWRUNNER_DATA_DIR": str(tmp_path / "data")}
    assert run_cli("run", str(flow), "-i", "question=Hi.", "--record", str(tape), env=env).returncode == 0
    old = tmp_path / "old.jsonl"
    old.write_text("".join(line + "\n" for line in tape.read_text().splitlines() if '"kind": "history"' not in line))
    out = run_cli("run", str(flow), "-i", "question=Hi.", "--replay", str(old), env=env)
    assert out.returncode == 1
    assert "the history has 2 more messages than when recorded (request.messages: recorded 2, now 4)" in out.stderr
    assert "holds no history loads" in out.stderr and "the --record run saved its own turn" in out.stderr
    assert "messages[1].content" not in out.stderr and "Traceback" not in out.stderr
    # The same recording replays on a history as empty as when it was recorded.
    clean = {**env, "FLOWRUNNER_DATA_DIR": str(tmp_path / "clean")}
    assert run_cli("run", str(flow), "-i", "question=Hi.", "--replay", str(old), env=clean).returncode == 0
    # A recording for another step's history is a clear mismatch, not a silent read of the store.
    renamed = write_flow(REMEMBERING.replace("id: recall", "id: recall_2"), "renamed.yaml")
    out = run_cli("run", str(renamed), "-i", "question=Hi.", "--replay", str(tape), env=env)
    assert out.returncode == 1 and "no recorded history left for step 'recall_2'" in out.stderr


# --- 2 and 3. the README's first ten minutes, as printed -----------------------------------------

def first_ten_minutes() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of the section, in order, dedented."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Your first ten minutes")
    section = readme[start:readme.index("\n## ", start + 1)]
    return [(lang, textwrap.dedent(body)) for _indent, lang, body in
            re.findall(r"^( *)```(\w+)\n(.*?)^\1```[ \t]*$", section, re.M | re.S)]


ACTIVATE = "set -eo pipefail\nsource .venv/bin/activate\n"  # what "Set-up" tells a user to do once per shell
CI_LINE = "# in CI (no key, no model server):"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shell:
    """The copy of the repository, its environment, and what each block left behind."""

    def __init__(self, repo: Path, env: dict[str, str], log: Path) -> None:
        self.repo, self.env, self.log = repo, env, log

    def sh(self, script: str, env: dict[str, str] | None = None, shell: str = "bash",
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shell, "-c", script], cwd=self.repo, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)

    def check(self, what: str, out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        assert out.returncode == 0, \
            f"{what} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out


@pytest.fixture
def copy(tmp_path, openai_server):
    """A copy of the repository with `.venv` linked in (as `make demo` leaves it), its files staged in a
    git repository of its own, a fresh data directory, and the docs ingested (what `make demo` did)."""
    repo = fresh_copy(tmp_path / "repo")
    (repo / ".venv").symlink_to(ROOT / ".venv")
    git_snapshot(repo)
    data, scratch = tmp_path / "data", tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FLOWRUNNER_", "VIRTUAL_ENV"))}
    env.update(OPENAI_BASE_URL=openai_server.base_url, OPENAI_API_KEY="sk-test", FLOWRUNNER_DATA_DIR=str(data),
               TMPDIR=str(scratch))  # TMPDIR: the record block's `mktemp -d` lands here
    shell = Shell(repo, env, tmp_path / "flowrunner.log")
    try:
        shell.check("make demo's ingest", shell.sh(ACTIVATE + "flowrunner run flows/ingest_docs.yaml"))
        yield shell
    finally:  # every embedded PostgreSQL the commands started, stopped as the README says
        for pid_file in [*data.rglob("postmaster.pid"), *scratch.rglob("postmaster.pid")]:
            shell.sh(ACTIVATE + f"flowrunner db stop --data-dir '{pid_file.parent}'")


def test_every_block_of_your_first_ten_minutes_runs_as_printed(copy: Shell, llm) -> None:
    blocks = first_ten_minutes()
    assert [lang for lang, _ in blocks] == ["sh", "yaml", "sh", "cron", "sh", "cron", "sh", "python"], \
        "a new kind of block in 'Your first ten minutes': teach this test to run it"
    served: subprocess.Popen[str] | None = None
    port = 0
    try:
        for n, (lang, block) in enumerate(blocks, 1):
            what = f"block {n} ({lang}):\n{block}"
            assert ".venv/bin/flowrunner" not in block.replace(". .venv/bin/activate &&", ""), \
                f"{what}\nuses .venv/bin/flowrunner: the README's form is `flowrunner` once activated"
            if lang == "yaml":  # the CI workflow: its commands (the environment already holds `pip install .`)
                steps = yaml.safe_load(block)["jobs"]["validate"]["steps"]
                for command in [s["run"] for s in steps if "run" in s and s["run"] != "pip install ."]:
                    out = copy.check(what, copy.sh(ACTIVATE + command))
                    assert "file(s) valid" in out.stderr, out
            elif lang == "cron":
                for line in filter(str.strip, block.splitlines()):
                    run_cron_line(copy, line, what)
            elif lang == "python":  # the client, against the served flow
                assert served is not None, "the Python client comes after `flowrunner serve`"
                llm.script(Reply(text=["pgvector adds", " vector search."]))
                code = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                out = copy.check(what, subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code], cwd=copy.repo,
                                                      env=copy.env, capture_output=True, text=True, timeout=120))
                assert out.stdout == "pgvector adds vector search.", out.stdout
            elif "flowrunner serve" in block:
                port = free_port()
                served = start_serve(copy, block.replace("--port 8000", f"--port {port}"), what)
            elif "--record" in block:
                run_record_replay(copy, block, what, llm)
            elif "flowrunner batch" in block:
                copy.check(what, copy.sh(ACTIVATE + block))
                results = [json.loads(line) for line in (copy.repo / "triage.jsonl").read_text().splitlines()]
                assert len(results) == 6 and all(r["status"] == "ok" for r in results), results
            else:  # the RAG chat with memory: the second question carries the first turn
                llm.script(Reply(text="IVFFlat and HNSW."), Reply(text="HNSW builds a graph."))
                out = copy.check(what, copy.sh(ACTIVATE + block))
                assert out.stdout.split("\n")[:2] == ["IVFFlat and HNSW.", "HNSW builds a graph."], out.stdout
                sent = [m["content"] for m in llm.chat_requests[-1].json["messages"]]
                assert sent[1:3] == ["What are the index types of pgvector?", "IVFFlat and HNSW."], sent
    finally:
        if served is not None:
            os.killpg(served.pid, signal.SIGTERM)
            served.wait(timeout=30)
    # 3. What the examples wrote (results, recordings, logs) is ignored by git or lies outside the copy.
    assert (copy.repo / "triage.jsonl").exists() and (copy.repo / "recordings").is_dir()
    assert git_changes(copy.repo) == []


def run_record_replay(copy: Shell, block: str, what: str, llm) -> None:
    """As printed, in one shell; at the "in CI" line the key and the model server go away, as CI has it."""
    assert CI_LINE in block, what
    offline = block.replace(CI_LINE, CI_LINE + "\nunset OPENAI_API_KEY; export OPENAI_BASE_URL=http://127.0.0.1:9/v1")
    llm.script(Reply(text=["It adds", " a vector type."]))
    out = copy.check(what, copy.sh(ACTIVATE + offline))
    # The recorded answer, then the same answer replayed from the recording (the --record run saved its
    # turn to the history the replay runs on: the replay serves the recorded history back).
    assert out.stdout.count("It adds a vector type.\n") == 2, out.stdout
    recording = (copy.repo / "recordings/rag.jsonl").read_text().splitlines()
    kinds = [json.loads(line).get("kind", "chat") for line in recording]
    # retrieval (its embedding) and the history load run in parallel: either may be recorded first
    assert sorted(kinds[:2]) == ["embedding", "history"] and kinds[2:] == ["chat"], kinds
    assert "not saved: the model was not called" in out.stderr
    assert out.stdout.count("stopped the embedded PostgreSQL in ") == 2  # after recording, after replaying


def run_cron_line(copy: Shell, line: str, what: str) -> None:
    """The command of a crontab line, as cron runs it: /bin/sh, cron's PATH, `%` unescaped; /srv/app is
    the copy and the log file a file of the test's."""
    fields = line.split(None, 5)
    assert len(fields) == 6 and fields[5].startswith("cd /srv/app && "), what
    command = fields[5].replace("cd /srv/app", f"cd '{copy.repo}'").replace("/var/log/flowrunner.log", str(copy.log))
    command = command.replace("\\%", "%")
    env = {**copy.env, "PATH": "/usr/bin:/bin"}  # cron's: flowrunner is found through the activation only
    copy.check(f"{what}\nthe line: {line}", copy.sh(command, env=env, shell="/bin/sh"))
    if "batch" in command:
        written = copy.repo / f"triage-{date.today():%Y-%m-%d}.jsonl"
        assert len(written.read_text().splitlines()) == 6


def start_serve(copy: Shell, block: str, what: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["bash", "-c", ACTIVATE + block], cwd=copy.repo, env=copy.env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("serving flow"):
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(timeout=60)
    if proc.poll() is not None or not any(line.startswith("serving flow") for line in lines):
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"{what}\ndid not start serving:\n{''.join(lines)}")
    return proc
