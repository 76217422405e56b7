"""How many concurrent streams `flowrunner serve` holds: time to first token and pacing under load,
against the raw upstream (the floor) and, when installed, LiteLLM's proxy, in the same run.

    python bench/serve_capacity.py [--streams 300] [--workers 1] [--chunks 200] [--rate 50] [--ramp 2]
                                   [--serve-cpus 0] [--load-cpus 1] [--no-litellm]

LiteLLM's proxy is measured when its `litellm` command is on PATH (pip install 'litellm[proxy]',
e.g. in a virtual environment of its own), pinned as serve is, with one worker and a master key of
this run's; otherwise a line says it was skipped.

The upstream is the local OpenAI test server (tests/support/openai_server.py, started as in
bench/batch_serve.py) answering every request with CHUNKS content deltas at RATE per second on a
fixed schedule (`--paced`: a busy upstream keeps the pace rather than drifting). STREAMS streaming
requests start evenly over RAMP seconds, each on its own connection, from a load client in this
process (uvloop and httptools: its own cost per chunk stays small). The upstream and the load client
run on --load-cpus, serve on --serve-cpus (pinned with sched_setaffinity, as `taskset -c` does), so
neither steals serve's core. Default: serve on the first cores (one per worker), the load on the last
one or two (each is one process, at most one core each).

For each side (the upstream itself, serve with each --workers value, LiteLLM's proxy) it prints:
- time to first token p50 / p99, and what that side adds over the floor's (the goal for serve at
  500 streams: p50 <= 50 ms, p99 <= 250 ms added);
- pacing: each stream's time from its request to its last delta against the upstream's schedule
  (CHUNKS / RATE): the worst stream's slowdown and the share of streams more than 10% slower
  (goal: none);
- the side's CPU over the run (all its processes: a parent and its workers), in cores, per chunk
  (the requests' own work included), and the concurrent streams one core would hold at that CPU per
  stream (the schedule's length / a stream's CPU): the throughput to compare between --workers values.
`--streams` and `--workers` take comma lists (`--workers 1,2 --streams 300,600`): every combination
runs, in the same run, against the same upstream. Every stream's text is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.batch_serve import API_KEY, FLOW, child_env, model_server_process, serve_process, stop  # noqa: E402

FLOW_NAME = "bench-chat"
SLOW = 0.10  # a stream this much slower than the upstream's schedule counts as slowed down


# --- the load client ----------------------------------------------------------------------------------

@dataclass
class Stream:
    start: float = 0.0  # when its connection was opened (time.perf_counter)
    first: float | None = None  # first content delta
    last: float | None = None
    parts: list[str] = field(default_factory=list)
    status: int | None = None
    error: str | None = None


class StreamClient(asyncio.Protocol):
    """One streaming request on its own connection, read with httptools: chunked framing undone in C,
    SSE events split on blank lines, each `data:` JSON parsed for its content delta."""

    def __init__(self, request: bytes, stream: Stream, done: asyncio.Future[None]) -> None:
        import httptools

        self.request, self.stream, self.done = request, stream, done
        self.parser = httptools.HttpResponseParser(self)
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as e:  # noqa: BLE001 - a broken response is this stream's error
            self._finish(f"bad HTTP response: {e}")

    def on_headers_complete(self) -> None:
        self.stream.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        if self.stream.status != 200:
            return
        *events, self.buffer = self.buffer.split(b"\n\n")
        now = time.perf_counter()
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            chunk = json.loads(event[6:])
            if "error" in chunk:
                self.stream.error = f"error event: {chunk['error']}"
                continue
            choices = chunk.get("choices")
            content = choices and (choices[0].get("delta") or {}).get("content")
            if content:
                if self.stream.first is None:
                    self.stream.first = now
                self.stream.last = now
                self.stream.parts.append(content)

    def on_message_complete(self) -> None:
        if self.stream.status != 200:
            self._finish(f"HTTP {self.stream.status}: {self.buffer[:200]!r}")
        else:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection lost ({exc or 'closed'})")

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            if error and not self.stream.error:
                self.stream.error = error
            self.done.set_result(None)
            if self.transport is not None:
                self.transport.close()


def http_request(url: str, body: dict[str, Any], key: str = API_KEY) -> tuple[str, int, bytes]:
    """host, port and the raw bytes of a POST of `body` to {url}/chat/completions."""
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1].rstrip("/") + "/chat/completions"
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n")
    return host, int(port), head.encode() + payload


async def load(url: str, model: str, streams: int, ramp: float, extra: dict[str, Any],
               key: str = API_KEY) -> tuple[list[Stream], float]:
    """`streams` streaming requests started evenly over `ramp` seconds; the streams and the wall time."""
    loop = asyncio.get_running_loop()
    results = [Stream() for _ in range(streams)]

    async def one(i: int, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        body = {"model": model, "messages": [{"role": "user", "content": f"question {i}: say the words"}],
                "stream": True, **extra}
        host, port, request = http_request(url, body, key)
        stream, done = results[i], loop.create_future()
        stream.start = time.perf_counter()
        try:
            await loop.create_connection(lambda: StreamClient(request, stream, done), host, port)
        except OSError as e:
            stream.error = f"cannot connect: {e}"
            return
        await done

    t0 = time.perf_counter() + 0.05
    await asyncio.gather(*(one(i, t0 + i * ramp / streams) for i in range(streams)))
    return results, time.perf_counter() - t0


def run_load(url: str, model: str, streams: int, ramp: float, extra: dict[str, Any] | None = None,
             key: str = API_KEY) -> tuple[list[Stream], float]:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(load(url, model, streams, ramp, extra or {}, key))


# --- CPU of a process tree -------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 0


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its children (serve's workers), the exited ones included."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields and (int(entry) == pid or int(fields[1]) == pid):  # fields[1]: ppid
            utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
            total += (utime + stime + cutime + cstime) / TICK
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the sides ---------------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    streams: list[Stream]
    wall: float
    cpu: float | None  # the side's own CPU seconds (None: the floor, which has no side of its own)
    load_cpu: float  # the upstream's and the load client's CPU seconds


def measure(name: str, url: str, model: str, args: argparse.Namespace, streams: int, upstream: subprocess.Popen,
            side: subprocess.Popen | None, expected: str, extra: dict[str, Any] | None = None,
            key: str = API_KEY) -> Result:
    run_load(url, model, min(streams, 10), 0.2, extra, key)  # warm up: connections, imports, caches
    side_before = tree_cpu(side.pid) if side else 0.0
    load_before = tree_cpu(upstream.pid) + own_cpu()
    results, wall = run_load(url, model, streams, args.ramp, extra, key)
    cpu = tree_cpu(side.pid) - side_before if side else None
    load_cpu = tree_cpu(upstream.pid) + own_cpu() - load_before
    for stream in results:
        if stream.error is None and "".join(stream.parts) != expected:
            stream.error = f"wrong text ({len(stream.parts)} of {args.chunks} deltas)"
    return Result(name, results, wall, cpu, load_cpu)


def pin(cpus: set[int]) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, cpus)


@contextmanager
def litellm_proxy(upstream_url: str, cpus: set[int], tmp: Path
                  ) -> Iterator[tuple[subprocess.Popen, str, str] | str]:
    """LiteLLM's proxy in front of the upstream, or a line saying why not."""
    exe = shutil.which("litellm") or str(Path(sys.executable).with_name("litellm"))
    if not Path(exe).exists():
        yield "LiteLLM's proxy: not installed (pip install 'litellm[proxy]' puts `litellm` on PATH): skipped"
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = "sk-" + secrets.token_hex(32)  # the proxy's own key, which its clients send
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": master}
    with open(tmp / "litellm.log", "w") as out:
        proc = subprocess.Popen([exe, "--model", "openai/gpt-4o-mini", "--api_base", upstream_url, "--host",
                                 "127.0.0.1", "--port", str(port), "--num_workers", "1"], cwd=tmp, env=env,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin(cpus))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    yield (f"LiteLLM's proxy did not start (see its log): skipped\n"
                           f"{(tmp / 'litellm.log').read_text()[-1500:]}")
                    return
                time.sleep(0.5)
        yield proc, f"http://127.0.0.1:{port}/v1", master
    finally:
        stop(proc)


# --- the report --------------------------------------------------------------------------------------

def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(result: Result, floor: Result | None, args: argparse.Namespace, load_cores: int) -> None:
    ok = [s for s in result.streams if s.error is None and s.first is not None]
    failed = [s for s in result.streams if s not in ok]
    n = len(result.streams)
    if not ok:
        print(f"{result.name:<30} every stream failed, e.g. {failed[0].error}")
        return
    ttft = [(s.first - s.start) * 1000 for s in ok]  # type: ignore[operator]
    schedule = args.chunks / args.rate
    slowdown = [(s.last - s.start) / schedule - 1 for s in ok]  # type: ignore[operator]
    p50, p99 = pct(ttft, 50), pct(ttft, 99)
    added = ""
    if floor is not None:
        fttft = [(s.first - s.start) * 1000 for s in floor.streams if s.error is None and s.first is not None]
        if fttft:
            added = f"{p50 - pct(fttft, 50):+8.1f} {p99 - pct(fttft, 99):+8.1f}"
    slow = sum(x > SLOW for x in slowdown)
    line = (f"{result.name:<30} {p50:8.1f} {p99:8.1f} {added or '       -        -':>17} "
            f"{max(slowdown) * 100:+9.1f}% {slow:>6}/{n:<5}")
    if result.cpu is not None:
        cores = result.cpu / result.wall
        per_chunk = result.cpu / (len(ok) * args.chunks) * 1e6
        held = len(ok) * schedule / result.cpu if result.cpu else float("inf")  # a stream's CPU, over its length
        line += f" {cores:6.2f} {per_chunk:7.1f} {held:8.0f}"
    print(line)
    if failed:
        print(f"{'':<30} {len(failed)} of {n} streams failed, e.g.: {failed[0].error}")
    busy = result.load_cpu / result.wall / load_cores
    if busy > 0.9:
        print(f"{'':<30} the load side (upstream + client) used {busy:.0%} of its {load_cores} core(s): "
              "its own delays are in these figures; give it more --load-cpus")


def cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def numbers(text: str) -> list[int]:
    values = [int(x) for x in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, comma-separated")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=numbers, default=[300], help="concurrent streams (comma list)")
    parser.add_argument("--workers", type=numbers, default=[1], help="serve --workers (comma list)")
    parser.add_argument("--chunks", type=int, default=200, help="content deltas per stream")
    parser.add_argument("--rate", type=float, default=50.0, help="the upstream's deltas per second")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the streams start")
    parser.add_argument("--serve-cpus", type=cpu_list, help="cores for serve (default: the first, one per worker)")
    parser.add_argument("--load-cpus", type=cpu_list, help="cores for the upstream and the client (default: the last 1-2)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    args = parser.parse_args()
    if args.chunks < 1 or args.rate <= 0 or args.ramp < 0:
        parser.error("--chunks, --rate and --ramp must be positive")
    exe = Path(sys.executable).with_name("flowrunner")
    if not exe.exists():
        sys.exit(f"{exe} not found: run `make install` (or pip install -e .) first")

    # Every stream is a connection on each hop: the client's, serve's to its client and to the upstream.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    available = sorted(os.sched_getaffinity(0))
    most = max(args.workers)
    if args.load_cpus:
        load_cpus = args.load_cpus
    else:  # the last one or two (the upstream and the client are one process each), leaving serve its own
        load_cpus = set(available[-min(2, max(1, len(available) - most)):]) if len(available) > 1 else set(available)
    serve_pool = sorted(args.serve_cpus or (set(available) - load_cpus) or set(available))
    os.sched_setaffinity(0, load_cpus)  # the client, and the upstream that inherits it

    expected = "".join(f" w{i}" if i else f"w{i}" for i in range(args.chunks))
    print(f"serve capacity: {', '.join(map(str, args.streams))} streams started evenly over {args.ramp:g} s, "
          f"{args.chunks} deltas each at {args.rate:g}/s (the upstream's schedule: {args.chunks / args.rate:.2f} s "
          f"per stream), on {len(available)} cores", flush=True)
    print(f"pinned (sched_setaffinity, as taskset -c): upstream and load client on {fmt(load_cpus)}; "
          f"serve on {fmt(set(serve_pool))}" + ("; LiteLLM's proxy as serve" if not args.no_litellm else ""))

    with tempfile.TemporaryDirectory(prefix="bench-serve-capacity-") as tmp_name:
        tmp = Path(tmp_name)
        flow = tmp / "chat.yaml"
        flow.write_text(FLOW)
        with model_server_process(expected, 1 / args.rate, "--paced") as (upstream, url):
            for streams in args.streams:
                print(f"\n{streams} streams")
                print(f"{'':<30} {'TTFT ms':>17} {'added vs floor':>17} {'pacing':>26}   {'CPU':>24}")
                print(f"{'side':<30} {'p50':>8} {'p99':>8} {'p50':>8} {'p99':>8} {'worst':>10} "
                      f"{'>10% slower':>12} {'cores':>6} {'µs/chunk':>7} {'streams/core':>8}", flush=True)
                floor = measure("upstream (the floor)", url, "gpt-4o-mini", args, streams, upstream, None, expected,
                                {"stream_options": {"include_usage": True}})
                report(floor, None, args, len(load_cpus))
                for workers in args.workers:
                    cpus = set(serve_pool[:workers]) if len(serve_pool) >= workers else set(serve_pool)
                    name = f"flowrunner serve, {workers} worker{'s' if workers > 1 else ''}"
                    with serve_process(flow, child_env(url), tmp, *(["--workers", str(workers)] if workers > 1 else []),
                                       preexec_fn=pin(cpus)) as (proc, served):
                        result = measure(name, served, FLOW_NAME, args, streams, upstream, proc, expected)
                    report(result, floor, args, len(load_cpus))
                    if workers > len(cpus):
                        print(f"{'':<30} ({workers} workers on {len(cpus)} core(s): no room to scale here)")
                if args.no_litellm:
                    continue
                with litellm_proxy(url, set(serve_pool[:1]), tmp) as proxy:
                    if isinstance(proxy, str):
                        print(proxy)
                    else:
                        report(measure("LiteLLM proxy", proxy[1], "openai/gpt-4o-mini", args, streams, upstream,
                                       proxy[0], expected, key=proxy[2]), floor, args, len(load_cpus))
    print("\nTTFT: from opening the connection to the first content delta. pacing: request to last delta "
          "against the schedule. CPU: the side's processes over the run (µs/chunk: per delta delivered, the "
          "requests' own work included); streams/core: the streams one core would hold at that CPU per stream "
          "(a stream's schedule / its CPU).")


def fmt(cpus: set[int]) -> str:
    return "core " + ",".join(map(str, sorted(cpus))) if len(cpus) == 1 else "cores " + ",".join(map(str, sorted(cpus)))


if __name__ == "__main__":
    main()
