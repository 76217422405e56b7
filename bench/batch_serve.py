"""`flowrunner batch` and `flowrunner serve` against the raw openai SDK / direct requests, same local server, same run.

    python bench/batch_serve.py [--items 200] [--concurrency 20] [--words 20] [--repeat 3] [--ttft-runs 100]

The model is the local OpenAI test server (tests/support/openai_server.py) paced at 50 chunks/s
(Reply(text=..., chunk_delay=0.02)), in its own process, so its CPU is not counted on either side.
Prints:
- batch throughput: items/s of the real CLI, `flowrunner batch FLOW --inputs items.jsonl
  --concurrency C --output results.jsonl` (a subprocess; the flow is a one-step chat flow like
  flows/chat.yaml), against a plain asyncio loop of C workers making raw AsyncOpenAI streaming calls
  (every chunk consumed) over the same items, and their ratio (goal: >= 0.95);
- serve time to first token: p50/p90 of the first content delta of streaming requests sent straight
  to the test server and through `flowrunner serve FLOW --port 0` (a subprocess), interleaved, with
  the same raw httpx2 client for both, and what serve adds at p50 (goal: <= 2 ms).
Several runs of each batch side are interleaved and their medians kept: the machines are noisy."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXE = Path(sys.executable).with_name("flowrunner")

# flows/chat.yaml, pointed at the test server through OPENAI_BASE_URL. Written out here rather than
# read from flows/ so that the baseline's request (below) is the same request, field for field.
FLOW = """
version: 1
name: bench-chat
inputs:
  question: {type: string}
  model: {type: string, default: gpt-4o-mini}
connections:
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}"}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: ${inputs.model}
    system_prompt: You are a helpful assistant. Answer briefly.
    user_prompt: ${inputs.question}
    temperature: 0.2
    max_completion_tokens: 800
outputs:
  answer: ${response}
"""
SYSTEM = "You are a helpful assistant. Answer briefly."
API_KEY = "sk-bench"
SERVING = re.compile(r"serving flow '[^']*' at (http://\S+/v1)")


def request_body(question: str) -> dict[str, Any]:
    """What the flow's chat step sends (stream_options included: the server then sends one more event)."""
    return {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": question}],
            "temperature": 0.2, "max_completion_tokens": 800, "stream": True,
            "stream_options": {"include_usage": True}}


def question(i: int) -> str:
    return f"question number {i}: what does item {i} say?"


@contextmanager
def model_server(text: str, delay: float, *args: str) -> Iterator[str]:
    with model_server_process(text, delay, *args) as (_proc, url):
        yield url


@contextmanager
def model_server_process(text: str, delay: float, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    # The standalone test server answers every chat request with Reply(text=text, chunk_delay=delay).
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--chunk-delay", str(delay),
                             "--text", text, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not url:
            raise SystemExit("the test server did not start")
        yield proc, url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def child_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWRUNNER_API_KEY"}  # serve would demand it
    env.update(OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=base_url)
    return env


# --- batch ------------------------------------------------------------------------------------

def flowrunner_batch(tmp: Path, flow: Path, items: Path, concurrency: int, env: dict[str, str],
                     expected: str, count: int) -> dict[str, Any]:
    """One `flowrunner batch` run. Its time is the CLI's own: the `seconds` of the "batch finished"
    JSON line it logs on stderr (stderr is a file here, not a terminal). That clock starts after the
    interpreter, click and the flow are loaded, so process start-up is out; what remains in it is the
    in-process warm-up (the lazy imports of the engine, the chat step and the openai SDK in the first
    items, the SDK client): see `steady` in main() for how that is taken out as well."""
    results, log = tmp / "results.jsonl", tmp / "batch.log"
    results.unlink(missing_ok=True)
    with open(log, "w") as err:
        start = time.perf_counter()
        code = subprocess.run([str(EXE), "batch", str(flow), "--inputs", str(items), "--concurrency",
                               str(concurrency), "--output", str(results)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=err, check=False).returncode
        wall = time.perf_counter() - start
    lines = log.read_text().splitlines()
    summary = next((json.loads(line) for line in reversed(lines) if '"batch finished"' in line), None)
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    bad = [r for r in records if r["status"] != "ok" or r["outputs"].get("answer") != expected]
    if code != 0 or summary is None or len(records) != count or bad:
        tail = "\n".join(lines[-5:])
        raise SystemExit(f"flowrunner batch failed (exit {code}, {len(records)} of {count} results, "
                         f"{len(bad)} wrong):\n{tail}")
    results.unlink()
    latencies = sorted(r["latency"] for r in records)
    return {"seconds": float(summary["seconds"]), "wall": wall, "latencies": latencies}


async def sdk_batch(url: str, count: int, concurrency: int, expected: str) -> dict[str, Any]:
    """The baseline: C workers over one shared iterator of items (as `flowrunner batch` does), each a
    raw `chat.completions.create(stream=True)` read chunk by chunk. A fresh client per run, so its
    first requests open their connections, as the CLI's do."""
    import openai

    client = openai.AsyncOpenAI(api_key=API_KEY, base_url=url)
    latencies: list[float] = []
    wrong = 0

    async def worker(items: Iterator[int]) -> None:
        nonlocal wrong
        for i in items:
            t = time.monotonic()
            stream = await client.chat.completions.create(**request_body(question(i)))
            parts = []
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        parts.append(chunk.choices[0].delta.content)
            latencies.append(time.monotonic() - t)
            wrong += "".join(parts) != expected

    items = iter(range(count))
    start = time.perf_counter()
    await asyncio.gather(*(worker(items) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    if wrong:
        raise SystemExit(f"the baseline got {wrong} wrong answers")
    return {"seconds": seconds, "latencies": sorted(latencies)}


def bench_batch(url: str, tmp: Path, flow: Path, args: argparse.Namespace, expected: str) -> dict[str, Any]:
    n, c = args.items, args.concurrency
    files = {}
    for size in (n, c):
        files[size] = tmp / f"items-{size}.jsonl"
        files[size].write_text("".join(json.dumps({"question": question(i)}) + "\n" for i in range(size)))
    env = child_env(url)
    asyncio.run(sdk_batch(url, c, c, expected))  # warm up: the SDK's imports and pydantic models
    flowrunner_batch(tmp, flow, files[c], c, env, expected, c)  # warm up: page cache, .pyc files

    ours: dict[int, list[dict[str, Any]]] = {n: [], c: []}
    sdk: dict[int, list[dict[str, Any]]] = {n: [], c: []}
    for r in range(args.repeat):
        for side in (("sdk", "ours") if r % 2 else ("ours", "sdk")):  # interleaved: same noise for both
            for size in (n, c):
                if side == "ours":
                    ours[size].append(flowrunner_batch(tmp, flow, files[size], c, env, expected, size))
                else:
                    sdk[size].append(asyncio.run(sdk_batch(url, size, c, expected)))
        last = ours[n][-1], sdk[n][-1], ours[c][-1], sdk[c][-1]
        print(f"run {r + 1}/{args.repeat}: {n} items: flowrunner {last[0]['seconds']:.2f} s (CLI summary; "
              f"{last[0]['wall']:.2f} s wall with start-up), SDK {last[1]['seconds']:.2f} s;  "
              f"{c} items: flowrunner {last[2]['seconds']:.2f} s, SDK {last[3]['seconds']:.2f} s", flush=True)

    def med(runs: list[dict[str, Any]], key: str = "seconds") -> float:
        return statistics.median(run[key] for run in runs)

    return {
        "ours_n": med(ours[n]), "sdk_n": med(sdk[n]), "ours_c": med(ours[c]), "sdk_c": med(sdk[c]),
        "wall_n": med(ours[n], "wall"), "wall_c": med(ours[c], "wall"),
        "ours_lat": statistics.median(x for run in ours[n] for x in run["latencies"]),
        "sdk_lat": statistics.median(x for run in sdk[n] for x in run["latencies"]),
        "ours_first": statistics.median(run["latencies"][-1] for run in ours[c]),  # the slowest of the first round
        "sdk_first": statistics.median(run["latencies"][-1] for run in sdk[c]),
    }


# --- serve ------------------------------------------------------------------------------------

@contextmanager
def flowrunner_serve(flow: Path, env: dict[str, str], tmp: Path) -> Iterator[str]:
    with serve_process(flow, env, tmp) as (_proc, url):
        yield url


@contextmanager
def serve_process(flow: Path, env: dict[str, str], tmp: Path, *args: str,
                  **popen: Any) -> Iterator[tuple[subprocess.Popen, str]]:
    """`flowrunner serve FLOW --port 0 ARGS...` (`popen`: more for subprocess.Popen), once it serves."""
    log = tmp / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(EXE), "serve", str(flow), "--port", "0", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, **popen)
    try:
        deadline = time.monotonic() + 30
        while True:
            match = SERVING.search(log.read_text())
            if match:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"flowrunner serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield proc, match.group(1)
    finally:
        stop(proc)


async def first_token(client: Any, base_url: str, body: dict[str, Any]) -> tuple[float, float]:
    """Seconds from sending the request to the first content delta, and from the response's head to
    that delta. The rest of the stream is read to the end, so the connection goes back to the pool
    (and serve's upstream one to its pool)."""
    first = None
    start = time.perf_counter()
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        head = time.perf_counter()
        if response.status_code != 200:
            raise SystemExit(f"{base_url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter()
    if first is None:
        raise SystemExit(f"{base_url}: the stream had no content")
    return first - start, first - head


async def bench_ttft(direct: str, served: str, runs: int) -> dict[str, list[float]]:
    import httpx2

    body = request_body("time to first token, please")
    samples: dict[str, list[float]] = {"direct": [], "served": [], "direct_gap": [], "served_gap": []}
    async with httpx2.AsyncClient(timeout=30, trust_env=False,
                                  headers={"authorization": f"Bearer {API_KEY}"}) as client:
        urls = {"direct": direct, "served": served}
        for _ in range(5):  # warm up: connections (ours and serve's upstream), imports, caches
            for url in urls.values():
                await first_token(client, url, body)
        for i in range(runs):
            for side in (("served", "direct") if i % 2 else ("direct", "served")):  # interleaved
                ttft, gap = await first_token(client, urls[side], body)
                samples[side].append(ttft)
                samples[f"{side}_gap"].append(gap)
    return samples


def p(samples: list[float], q: int) -> float:
    """The q-th percentile, in ms."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200, help="N: items per batch")
    parser.add_argument("--concurrency", type=int, default=20, help="C: concurrent requests, both sides")
    parser.add_argument("--words", type=int, default=20, help="content chunks per answer (at 50 chunks/s)")
    parser.add_argument("--repeat", type=int, default=3, help="batch runs per side (medians are kept)")
    parser.add_argument("--ttft-runs", type=int, default=100, help="requests each, direct and through serve")
    args = parser.parse_args()
    if not EXE.exists():
        sys.exit(f"{EXE} not found: run `make install` (or pip install -e .) first")
    if args.items <= args.concurrency:
        sys.exit("--items must be more than --concurrency (the steady-state figure subtracts one round)")
    expected = " ".join(f"w{i}" for i in range(args.words))
    n, c = args.items, args.concurrency

    with tempfile.TemporaryDirectory(prefix="bench-batch-serve-") as tmp_name:
        tmp = Path(tmp_name)
        flow = tmp / "chat.yaml"
        flow.write_text(FLOW)
        with model_server(expected, 0.02) as url, model_server("ttft probe " * 3, 0.02) as ttft_url:
            print(f"batch: {n} items, concurrency {c}, {args.words} chunks per answer at 50 chunks/s; "
                  f"{args.repeat} runs per side", flush=True)
            b = bench_batch(url, tmp, flow, args, expected)
            print(f"serve: {args.ttft_runs} streaming requests each, direct and through flowrunner serve, "
                  "interleaved", flush=True)
            with flowrunner_serve(flow, child_env(ttft_url), tmp) as served_url:
                t = asyncio.run(bench_ttft(ttft_url, served_url, args.ttft_runs))

    # Batch, fairly. The CLI's summary clock leaves process start-up out, but not the warm-up inside
    # the process (lazy imports of the engine and the openai SDK, the client, the first connections),
    # which lands on the first round of items while the baseline has done its imports before its clock.
    # So the steady-state figure (the goal's) is differential, on both sides alike: the time of N items
    # minus the time of C items (one round, same warm-up), i.e. (N - C) items / (t(N) - t(C)). The
    # plain N / t(N) from the CLI's own summary is printed too, warm-up and all.
    ours_steady = (n - c) / (b["ours_n"] - b["ours_c"])
    sdk_steady = (n - c) / (b["sdk_n"] - b["sdk_c"])
    ours_cold, sdk_cold = n / b["ours_n"], n / b["sdk_n"]
    added = p(t["served"], 50) - p(t["direct"], 50)

    print()
    print(f"{'':<46} {'flowrunner':>11} {'baseline':>11} {'result':>10}   goal")
    print(f"{'batch items/s, steady ((N-C) / (t(N) - t(C)))':<46} {ours_steady:>11.1f} {sdk_steady:>11.1f} "
          f"{ours_steady / sdk_steady:>9.3f}x   >= 0.95")
    print(f"{'batch items/s, CLI summary (N / t(N), cold)':<46} {ours_cold:>11.1f} {sdk_cold:>11.1f} "
          f"{ours_cold / sdk_cold:>9.3f}x   (for scale: in-process warm-up included)")
    print(f"{'serve time to first token p50':<46} {p(t['served'], 50):>8.2f} ms {p(t['direct'], 50):>8.2f} ms "
          f"{added:>+7.2f} ms   <= 2 ms added")
    print(f"{'serve time to first token p90':<46} {p(t['served'], 90):>8.2f} ms {p(t['direct'], 90):>8.2f} ms "
          f"{p(t['served'], 90) - p(t['direct'], 90):>+7.2f} ms")
    print()
    print(f"details: t({n}) {b['ours_n']:.2f} s vs {b['sdk_n']:.2f} s, t({c}) {b['ours_c']:.2f} s vs "
          f"{b['sdk_c']:.2f} s (flowrunner vs SDK, medians); flowrunner wall with process start-up "
          f"{b['wall_n']:.2f} s / {b['wall_c']:.2f} s")
    print(f"         item latency p50 {b['ours_lat'] * 1000:.0f} ms vs {b['sdk_lat'] * 1000:.0f} ms; slowest item "
          f"of a {c}-item run {b['ours_first'] * 1000:.0f} ms vs {b['sdk_first'] * 1000:.0f} ms (first-round warm-up)")
    print(f"         response head to first content p50: served {p(t['served_gap'], 50):.2f} ms, direct "
          f"{p(t['direct_gap'], 50):.2f} ms (serve sends its head once the model has accepted the request, so "
          "they match; 40 ms more would be Nagle + delayed ACK: TCP_NODELAY off on serve's socket)")
    print("baseline: batch = raw AsyncOpenAI streaming calls, C workers; serve = the same httpx2 requests "
          "straight to the test server")


if __name__ == "__main__":
    main()
