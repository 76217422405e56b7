"""The chat step's streaming cost against the raw openai SDK, on the same local server, same run.

    python bench/chat_stream.py [--chunks 3000] [--repeat 5] [--ttft-runs 30] [--streams 1000]

Prints:
- chunks per CPU second: the SDK's `async for chunk in stream` vs a flowrunner run of a chat flow
  (engine, events and all), and their ratio (goal: >= 4);
- time to first token at 50 chunks/s: p50 for the SDK and for flowrunner, and what flowrunner adds
  (goal: nothing measurable);
- memory: RSS after the first and the last of many streams through one process (goal: flat).
The servers run in their own processes, so their CPU is not counted."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOW = """
version: 1
name: bench
connections:
  llm: {type: openai, api_key: sk-bench, base_url: "${env.BENCH_BASE_URL}"}
steps:
  - {id: answer, type: chat_completion, connection: llm, model: gpt-4o-mini, user_prompt: go}
"""


@contextmanager
def server(text: str, delay: float) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--chunk-delay", str(delay),
                             "--text", text], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def sdk_stream(client: Any) -> tuple[int, float | None]:
    start, first, n = time.perf_counter(), None, 0
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "go"}],
                                                  stream=True, stream_options={"include_usage": True})
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - start
                n += 1
    return n, first


async def flow_stream(flow: Any, connections: Any) -> tuple[int, float | None]:
    from flowrunner.engine import Run
    from flowrunner.events import TextDelta

    start, first, n = time.perf_counter(), None, 0
    run = Run(flow, {}, connections=connections)
    async for event in run.events():
        if type(event) is TextDelta:
            if first is None:
                first = time.perf_counter() - start
            n += 1
    if run.errors:
        raise SystemExit(f"the flow failed: {run.errors[0]}")
    return n, first


async def measure(url: str, args: argparse.Namespace, ttft_url: str) -> None:
    import openai

    from flowrunner import logs
    from flowrunner.connections.pool import Connections
    from flowrunner.flow.build import load_flow_text

    logs.configure("json", "warning")  # as the CLI on a terminal: no per-step log lines
    os.environ["BENCH_BASE_URL"] = url
    flow = load_flow_text(FLOW, "bench.yaml")
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url)

    async def cpu(label: str, fn: Any) -> float:
        await fn()  # warm up: connections, imports, caches
        start, chunks = time.process_time(), 0
        for _ in range(args.repeat):
            chunks += (await fn())[0]
        per_s = chunks / (time.process_time() - start)
        print(f"{label:<34} {per_s:>12,.0f} chunks per CPU second ({chunks} chunks)")
        return per_s

    async with Connections(flow) as conns:
        sdk = await cpu("openai SDK (async for chunk)", lambda: sdk_stream(client))
        ours = await cpu("flowrunner run (chat_completion)", lambda: flow_stream(flow, conns))
    print(f"ratio flowrunner / SDK: {ours / sdk:.2f}x  (goal: >= 4)")

    os.environ["BENCH_BASE_URL"] = ttft_url
    flow = load_flow_text(FLOW, "bench.yaml")
    client = openai.AsyncOpenAI(api_key="sk-bench", base_url=ttft_url)
    async with Connections(flow) as conns:
        sdk_t, our_t = [], []
        await sdk_stream(client), await flow_stream(flow, conns)
        for _ in range(args.ttft_runs):  # interleaved, so machine noise hits both alike
            sdk_t.append((await sdk_stream(client))[1])
            our_t.append((await flow_stream(flow, conns))[1])
        p50s, p50o = statistics.median(sdk_t) * 1000, statistics.median(our_t) * 1000
        print(f"time to first token p50 at 50 chunks/s: SDK {p50s:.2f} ms, flowrunner {p50o:.2f} ms, "
              f"added {p50o - p50s:+.2f} ms")

        before = None
        for i in range(args.streams):
            await flow_stream(flow, conns)
            if i == args.streams // 10:
                before = rss_mb()
        print(f"memory over {args.streams} streams: RSS {before:.1f} MB after {args.streams // 10 + 1}, "
              f"{rss_mb():.1f} MB after {args.streams}")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ttft-runs", type=int, default=30)
    parser.add_argument("--streams", type=int, default=1000)
    args = parser.parse_args()
    long_text = " ".join(f"w{i}" for i in range(args.chunks))
    with server(long_text, 0) as url, server("ttft probe " * 3, 0.02) as ttft_url:
        asyncio.run(measure(url, args, ttft_url))


if __name__ == "__main__":
    main()
