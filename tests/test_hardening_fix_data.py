"""Issue 17, review of the data hardening: a long-lived process (serve, batch) sees a table that was
ingested, or a model that was recorded, after its first search; a recorded width written as text;
the embedding connection's load-time errors; hostile --replay files. Real PostgreSQL with pgvector,
the OpenAI-protocol test server, the CLI in child processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_hardening_data import INGEST, SEARCH, _write_docs
from tests.test_serve import serve  # noqa: F401 (the fixture)

SERVED_SEARCH = """
version: 1
name: served-search
inputs:
  question: {{type: string}}
connections:
  llm: {{type: openai, api_key: "${{env.OPENAI_API_KEY}}", base_url: "${{env.OPENAI_BASE_URL}}"}}
  db: {{type: postgres, dsn: "{dsn}"}}
steps:
  - id: find
    type: vector_search
    connection: db
    table: documents
    {search}
    top_k: 1
outputs:
  answer: ${{passages[0].content}}
"""
BY_QUERY = "query: ${{inputs.question}}\n    embedding: {{connection: llm, model: {model}, dimensions: 16}}"
BY_VECTOR = "vector: [" + ", ".join(["1"] + ["0"] * 15) + "]"  # no model: the table's existence and width
DOCS = ("# Cats\n\nCats sleep most of the day.", "# Postgres\n\npgvector finds nearest neighbours.")


def _served(pg, model: str = "emb-a", *, by_vector: bool = False) -> str:
    search = BY_VECTOR if by_vector else BY_QUERY.format(model=model)
    return SERVED_SEARCH.format(dsn=pg.dsn, search=search)


def _ask(server) -> tuple[int, str]:
    """(status, the answer or the error's message) of one plain request to the served flow."""
    response = server.post({"model": server.name, "messages": [{"role": "user", "content": "cats"}]})
    body = response.json()
    if response.status_code == 200:
        return 200, body["choices"][0]["message"]["content"]
    return response.status_code, body["error"]["message"]


def _ingest(pg, llm, tmp_path: Path, model: str = "emb-a"):
    ingest = tmp_path / "ingest.yaml"
    if not ingest.exists():
        _write_docs(tmp_path)
        ingest.write_text(INGEST.format(dims=16))
    return run_cli("run", str(ingest), "-i", f"model={model}", env={**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url})


@pytest.mark.parametrize("by_vector", [False, True], ids=["query", "vector"])
def test_a_served_search_before_the_first_ingest_finds_the_table_once_it_is_ingested(
        serve, pg, llm, tmp_path, by_vector: bool) -> None:
    server = serve(_served(pg, by_vector=by_vector))
    status, message = _ask(server)
    assert status != 200 and "table 'documents' does not exist" in message, message

    ingested = _ingest(pg, llm, tmp_path)  # another process, e.g. the nightly batch
    assert ingested.returncode == 0, ingested.stderr

    status, answer = _ask(server)  # the same serve process: no restart
    assert status == 200 and answer in DOCS, answer
    if not by_vector:
        assert answer == DOCS[0]
    assert "Traceback" not in server.stderr


def test_a_served_search_sees_a_model_that_another_process_records_later(serve, pg, llm, tmp_path) -> None:
    assert _ingest(pg, llm, tmp_path).returncode == 0
    pg.execute("COMMENT ON COLUMN documents.embedding IS NULL")  # as an older flowrunner left it
    server = serve(_served(pg, "emb-b"))
    status, _ = _ask(server)
    assert status == 200  # no model recorded: only the width is checked

    recorded = _ingest(pg, llm, tmp_path)  # takes the table as emb-a's, and records it
    assert recorded.returncode == 0 and "does not say which embedding model" in recorded.stderr, recorded.stderr

    status, message = _ask(server)
    assert status != 200, message
    assert "table 'documents' holds embeddings of emb-a" in message and "emb-b" in message


def test_a_recorded_width_written_as_text_is_the_same_width(pg, llm, tmp_path) -> None:
    assert _ingest(pg, llm, tmp_path).returncode == 0
    pg.execute("COMMENT ON COLUMN documents.embedding IS "
               "'flowrunner embedding: {\"model\": \"emb-a\", \"provider\": \"openai\", \"dimensions\": \"16\"}'")
    search = tmp_path / "search.yaml"
    search.write_text(SEARCH)
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    out = run_cli("run", str(search), "-i", "model=emb-a", "--output", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["passages"]) == 2
    other = run_cli("run", str(search), "-i", "model=emb-b", env=env)  # still a recorded model
    assert other.returncode == 1 and "holds embeddings of emb-a (openai, 16 dimensions)" in other.stderr


EMBED_CONNECTION = """version: 1
name: embed-connection
connections:
  llm: {{type: openai, api_key: k}}
  db: {{type: postgres, dsn: "postgresql://localhost/x"}}
steps:
  - {{id: find, type: vector_search, connection: db, table: d, query: hi, embedding: {{connection: {name}, model: m}}}}
"""


@pytest.mark.parametrize(("name", "message", "hint"), [
    ("db", "steps[0].embedding.connection: connection 'db' is postgres, but an embedding needs openai or "
           "azure_openai", None),
    ("lm", "steps[0].embedding.connection: unknown connection 'lm'", "did you mean 'llm'?"),
])
def test_an_embedding_connection_is_checked_like_a_steps(write_flow, name: str, message: str, hint: str | None) -> None:
    out = run_cli("validate", str(write_flow(EMBED_CONNECTION.format(name=name))))
    assert out.returncode == 1 and message in out.stdout, out.stdout
    if hint:
        assert hint in out.stdout


REPLAY_FLOW = """version: 1
name: replayed
connections:
  llm: {type: openai, api_key: k}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: hi}
"""
GOOD_LINE = '{"step": "answer", "request": {}, "chunks": []}'


@pytest.mark.parametrize(("line", "why"), [
    ('{"step": "answer", "kind": ["chat"], "request": {}, "chunks": []}', "not a recorded call"),
    ('{"step": "answer", "request": {"n": ' + "9" * 5000 + '}, "chunks": []}', "a number too long to read"),
    ('{"step": "answer", "request": ' + "[" * 100_000 + "]" * 100_000 + ', "chunks": []}',
     "a value nested too deeply to read"),
], ids=["kind is a list", "5000-digit integer", "nested 100000 deep"])
def test_a_hostile_replay_file_is_an_error_at_its_line(write_flow, tmp_path, line: str, why: str) -> None:
    tape = tmp_path / "tape.jsonl"
    tape.write_text(f"{GOOD_LINE}\n{line}\n")
    out = run_cli("run", str(write_flow(REPLAY_FLOW)), "--replay", str(tape))
    assert out.returncode == 2, out.stderr
    assert f"Error: {tape}:2:1: --replay: not a recording made with --record ({why})" in out.stderr
    assert "hint: each line is" in out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
