"""The flows shipped in flows/: each says what it needs, each is valid, and each runs against the
test servers (the ones that need PostgreSQL, SQL Server history or a model are run here or in the
tests of their step types)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import Reply
from tests.support.history import odbc_string

FLOWS = sorted(p for p in (ROOT / "flows").glob("*.yaml"))


@pytest.mark.parametrize("flow", FLOWS, ids=lambda p: p.name)
def test_each_example_says_what_it_needs_and_how_to_run_it(flow: Path) -> None:
    header = flow.read_text().split("\nversion:")[0]
    assert "# Needs:" in header and "# Run:" in header, flow.name
    assert run_cli("validate", str(flow)).returncode == 0


def test_hello_runs_with_nothing_else() -> None:
    out = run_cli("run", "flows/hello.yaml", "-i", "name=Ada", "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["greeting"] == "Hello, Ada!"


def test_the_azure_seed_example_with_sql_server_history(pg, llm) -> None:
    """Azure OpenAI (deployments), pgvector RAG and SQL Server history (pyodbc through psqlODBC)."""
    env = {**pg.env, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url,
           "AZURE_OPENAI_ENDPOINT": llm.azure_endpoint, "AZURE_OPENAI_API_KEY": "azure-key-1234",
           "HISTORY_ODBC": odbc_string(pg)}
    pg.execute("DROP TABLE IF EXISTS chat_history")
    assert run_cli("run", "flows/ingest_docs.yaml", env=env).returncode == 0
    flow = "flows/rag_chat_azure.yaml"
    missing = run_cli("run", flow, "-i", "question=q", env=env)
    assert missing.returncode == 1 and "flowrunner db init" in missing.stderr, missing.stderr
    init = run_cli("db", "init", flow, env=env)
    assert init.returncode == 0 and "chat_history is ready in" in init.stdout, init.stderr
    llm.script(Reply(text="It adds vector search."), Reply(text="HNSW is the second."))
    for q in ("What does pgvector add?", "and what about the second one?"):
        out = run_cli("run", flow, "-i", f"question={q}", "-i", "conversation_id=az", env=env)
        assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HNSW is the second.")
    last = llm.chat_requests[-1]
    assert last.path == "/openai/deployments/gpt-4o-mini/chat/completions"
    messages = last.json["messages"]
    assert messages[1:3] == [{"role": "user", "content": "What does pgvector add?"},
                             {"role": "assistant", "content": "It adds vector search."}]
    assert "(source: ../docs/" in messages[3]["content"]
    assert any(r.path == "/openai/deployments/text-embedding-3-small/embeddings" for r in llm.embedding_requests)
    assert len(pg.execute("SELECT 1 FROM chat_history WHERE conversation_id = 'az'")) == 4


def test_the_scheduled_batch_example_runs_its_sample_data(llm, tmp_path) -> None:
    llm.responder = lambda request: Reply(text="billing: charged twice" if "charged" in
                                          request.json["messages"][-1]["content"] else "other: no idea")
    out = tmp_path / "triage.jsonl"
    args = ("batch", "flows/triage_tickets.yaml", "--inputs", "flows/data/tickets.csv", "--map", "ticket=body",
            "--output", str(out), "--resume")
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda rec: rec["index"])
    assert [rec["outputs"]["ticket_id"] for rec in records] == [f"T-100{i}" for i in range(1, 7)]
    assert records[0]["outputs"]["triage"] == "billing: charged twice"
    assert records[5]["inputs"]["ticket"] == 'Search returns no results for words with accents, like "café".'
    assert len(llm.chat_requests) == 6
    again = run_cli(*args, env=env)  # the cron line run twice: nothing is asked again
    assert again.returncode == 0 and len(llm.chat_requests) == 6 and len(out.read_text().splitlines()) == 6
