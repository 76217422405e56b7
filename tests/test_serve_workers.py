"""Issue 16: `flowrunner serve --workers N`. Several processes answer on one port, each with its own
connections; SIGTERM to the parent stops them all and frees the port; a worker that dies is replaced;
the serve tests of tests/test_serve.py pass against two workers (the same test functions, imported
here, run with this module's fixtures, which start serve with --workers 2). The Kubernetes manifest
and the capacity bench's command of the README are run as printed.

The real CLI in a child process, the real openai SDK and raw HTTP as clients, the local
OpenAI-protocol test server as the model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx2
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, run_cli
from tests.support.fixtures import Reply
from tests.test_serve import (CHAT_FLOW, Server, served_once, serving, text_of, user,  # noqa: F401
                              test_100_concurrent_streams_each_get_their_own_answer,
                              test_a_named_conversation_comes_from_the_store, test_async_client_streaming_and_not,
                              test_chunks_reach_the_client_while_the_model_is_still_stalled,
                              test_client_hanging_up_a_stream_closes_the_model_stream,
                              test_client_timing_out_a_plain_request_closes_the_model_stream,
                              test_model_stream_broken_midway_delivers_the_text_then_an_error,
                              test_sigint_stops_the_server_without_a_traceback, test_sync_client_streaming_with_usage,
                              test_sync_client_without_streaming, test_upstream_failure_before_any_text_is_an_http_error)

WORKERS = ("--workers", "2")


# --- fixtures: those of tests/test_serve.py, with two workers ------------------------------------

@pytest.fixture
def serve(openai_server, tmp_path):
    """serve(flow_text, *args): `flowrunner serve --workers 2` for this test only, stopped at teardown."""
    yield from serving(openai_server.base_url, tmp_path, *WORKERS)


@pytest.fixture(scope="module")
def chat_server(openai_server, tmp_path_factory):
    yield from served_once(openai_server.base_url, tmp_path_factory.mktemp("serve-workers"), *WORKERS)


@pytest.fixture
def served(chat_server, llm) -> Server:
    return chat_server


# --- helpers ----------------------------------------------------------------------------------------

def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def healthz(server: Server) -> dict:
    """/healthz on a new connection each time, so any worker may take it."""
    response = httpx2.get(server.url.removesuffix("/v1") + "/healthz", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def answering_pids(server: Server, want: int = 2, tries: int = 300) -> set[int]:
    pids: set[int] = set()
    for _ in range(tries):
        pids.add(healthz(server)["pid"])
        if len(pids) >= want:
            break
    return pids


def port_of(server: Server) -> int:
    return int(re.search(r":(\d+)/v1$", server.url).group(1))  # type: ignore[union-attr]


def wait_until(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


# --- workers ----------------------------------------------------------------------------------------

def test_two_worker_processes_answer_on_one_port(served) -> None:
    workers = children(served.proc.pid)
    assert len(workers) == 2, workers
    pids = answering_pids(served)
    assert pids == workers  # both answer, and neither is the parent, which only supervises
    started = served.events("workers started")
    assert [(r["workers"], set(r["pids"])) for r in started] == [(2, workers)]


def test_each_request_line_names_the_worker_that_answered(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    workers = children(server.proc.pid)
    for i in range(40):  # a new client, so a new connection, each time
        server.client().chat.completions.create(model=server.name, messages=user(f"q{i}"))
        seen = {r.get("worker") for r in server.events("request")}
        if seen == workers:
            break
    assert {r.get("worker") for r in server.events("request")} == workers


def test_sigterm_stops_every_worker_and_frees_the_port(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    workers = children(server.proc.pid)
    assert len(workers) == 2 and answering_pids(server) == workers
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, server.stderr  # as a single serve ends after a drain
    assert not any(alive(pid) for pid in workers)
    with socket.socket() as probe:  # as serve binds it: nobody listens on the port any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port_of(server)))
    assert "Traceback" not in server.stderr, server.stderr


def test_a_stream_in_flight_finishes_when_the_parent_gets_sigterm(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    words = [f" w{i}" for i in range(12)]
    llm.script(Reply(text=words, chunk_delay=0.1))
    stream = server.client().chat.completions.create(model=server.name, messages=user("q"), stream=True)
    got = [text_of([next(c for c in stream if text_of([c]))])]
    server.proc.send_signal(signal.SIGTERM)  # to the parent: it passes it on to the worker streaming
    got += [text_of([chunk]) for chunk in stream]
    assert "".join(got) == "".join(words)  # drained: the whole answer, not an error
    assert server.wait(timeout=60) == 0, server.stderr
    assert not children(server.proc.pid)


def test_a_worker_that_dies_is_reported_and_replaced(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    workers = children(server.proc.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(children(server.proc.pid)) == 2 and victim not in children(server.proc.pid))
    assert wait_until(lambda: server.events("a worker died; starting another (its streams in flight were lost)"))
    died = server.events("a worker died; starting another (its streams in flight were lost)")
    replacement = (children(server.proc.pid) - workers).pop()
    assert [(r["worker"], r["how"], r["replacement"]) for r in died] == \
        [(victim, "killed by signal SIGKILL", replacement)]
    assert wait_until(lambda: answering_pids(server, tries=20) == children(server.proc.pid))
    reply = server.client().chat.completions.create(model=server.name, messages=user("still there?"))
    assert reply.choices[0].message.content == "Hello from the flowrunner test server."


def test_a_worker_stopped_on_its_own_drains_and_is_replaced(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    workers = children(server.proc.pid)
    one = min(workers)
    os.kill(one, signal.SIGTERM)  # recycling one worker: the other goes on serving
    assert wait_until(lambda: len(children(server.proc.pid)) == 2 and one not in children(server.proc.pid))
    assert wait_until(lambda: server.events("a worker stopped; starting another"))
    assert [r["worker"] for r in server.events("a worker stopped; starting another")] == [one]
    assert not server.events("a worker died; starting another (its streams in flight were lost)")
    assert server.client().chat.completions.create(model=server.name, messages=user("q")).choices


def test_workers_die_with_their_parent(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    workers = children(server.proc.pid)
    server.proc.kill()  # no chance to pass anything on
    server.wait(timeout=30)
    assert wait_until(lambda: not any(alive(pid) for pid in workers)), "workers outlived their parent"


def test_a_setup_error_is_reported_once_not_once_per_worker(write_flow) -> None:
    flow = write_flow(CHAT_FLOW)
    env = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    single = run_cli("serve", str(flow), "--port", "0", env=env, timeout=60)
    several = run_cli("serve", str(flow), "--port", "0", "--workers", "3", env=env, timeout=60)
    assert single.returncode == 2 and "needs an API key" in single.stderr, single.stderr
    assert several.returncode == single.returncode
    errors = [line for line in several.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [line for line in single.stderr.splitlines() if line.startswith("Error:")], several.stderr
    assert "serving flow" not in several.stderr and "Traceback" not in several.stderr


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", "100000"])
def test_workers_must_be_a_positive_number_or_auto(write_flow, value) -> None:
    result = run_cli("serve", str(write_flow(CHAT_FLOW)), "--port", "0", "--workers", value)
    assert result.returncode == 2
    assert "Invalid value for '--workers'" in result.stderr and "auto" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_stream_limit_counts_in_each_worker_and_its_429_says_so(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--max-concurrent-streams", "1")
    llm.script(*[Reply(text=["Held", " on"], stall_after=1, stall=600)] * 2)
    body = {"model": "m", "messages": user("q"), "stream": True}
    held, refusals = [], []
    with ExitStack() as stack:
        for _ in range(60):  # new connections until each worker holds its one stream
            response = stack.enter_context(httpx2.stream("POST", f"{server.url}/chat/completions", json=body,
                                                         timeout=30))
            if response.status_code == 200:
                lines = response.iter_lines()
                while '"Held"' not in next(lines):
                    pass
                held.append(lines)
                if len(held) == 2:
                    break
            else:
                refusals.append((response.status_code, json.loads(response.read())["error"]))
        assert len(held) == 2  # one per worker: the limit is not the whole server's
        for _ in range(6):  # whichever worker takes it now is full
            refused = httpx2.post(f"{server.url}/chat/completions", json=body, timeout=30)
            refusals.append((refused.status_code, refused.json()["error"]))
    assert {(status, e["code"]) for status, e in refusals} == {(429, "too_many_streams")}
    assert all("1 in each of the server's 2 worker processes" in e["message"] for _, e in refusals)
    assert len(llm.chat_requests) == 2


def test_workers_auto_starts_one_per_cpu(serve, llm) -> None:
    server = serve(CHAT_FLOW.replace("served-chat", "served-auto"), "--workers", "auto")  # the last --workers wins
    cpus = len(os.sched_getaffinity(0))
    assert [r["workers"] for r in server.events("workers started")] == [cpus]
    assert len(children(server.proc.pid)) == cpus


# --- the README ---------------------------------------------------------------------------------------

README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_manifest() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    manifest = next((b for b in blocks if "kind: Deployment" in b), None)
    assert manifest, "the README shows no Kubernetes Deployment"
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def test_the_readme_deployment_probes_healthz_and_keeps_history_in_postgresql(llm, pg_server, tmp_path,
                                                                             monkeypatch) -> None:
    docs = {doc["kind"]: doc for doc in readme_manifest()}
    deployment = docs["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    pod = deployment["template"]["spec"]
    container = pod["containers"][0]
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["flowrunner", "serve"] and "--workers" in command
    port = container["ports"][0]["containerPort"]
    assert command[command.index("--port") + 1] == str(port) and command[command.index("--host") + 1] == "0.0.0.0"
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/healthz" and readiness["port"] == port and liveness["port"] == port
    # The preStop sleep (the Service stops sending new connections meanwhile), then the drain's grace
    # (--grace, default 25 s), both end before Kubernetes' SIGKILL.
    grace = float(command[command.index("--grace") + 1]) if "--grace" in command else 25.0
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and pod.get("terminationGracePeriodSeconds", 30) > float(pre_stop[1]) + grace
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert {"OPENAI_API_KEY", "HISTORY_DSN"} <= set(secrets)

    # The flow of the ConfigMap, mounted where the Deployment says, served as the container's command
    # does (here on port 0 of 127.0.0.1) with its history in PostgreSQL: two workers take turns on one
    # conversation, and each turn sees all the earlier ones, whichever worker saved them.
    mount = container["volumeMounts"][0]["mountPath"]
    flows = tmp_path / "flows"
    flows.mkdir()
    for name, text in docs["ConfigMap"]["data"].items():
        (flows / name).write_text(text, encoding="utf-8")
    flow, *args = [a.replace(mount, str(flows)) for a in command[2:]]
    args[args.index("--port") + 1], args[args.index("--host") + 1] = "0", "127.0.0.1"
    pg_server.execute("DROP TABLE IF EXISTS chat_history")
    monkeypatch.setenv("HISTORY_DSN", pg_server.dsn)
    init = pod["initContainers"][0]["command"]
    assert init[:3] == ["flowrunner", "db", "init"]
    created = run_cli(*[a.replace(mount, str(flows)) for a in init[1:]], env={"OPENAI_API_KEY": "sk-k8s"})
    assert created.returncode == 0, created.stderr
    server = Server(Path(flow), llm.base_url, *args)
    try:
        for turn in range(30):  # until both workers took turns (a new connection each: either may)
            llm.script(Reply(text=f"a{turn}"))
            with server.client() as client:  # a new connection each turn: any worker may take it
                reply = client.chat.completions.create(model=server.name, messages=user(f"q{turn}"),
                                                       extra_body={"conversation_id": "k8s-1"})
            assert reply.choices[0].message.content == f"a{turn}"
            sent = llm.chat_requests[-1].body["messages"]
            earlier = [m["content"] for m in sent if m["role"] in ("user", "assistant")]
            history = [x for t in range(turn) for x in (f"q{t}", f"a{t}")][-20:]  # history_load's max_messages
            assert earlier == history + [f"q{turn}"]
            if turn >= 3 and len({r.get("worker") for r in server.events("request")}) == 2:
                break
        assert len({r.get("worker") for r in server.events("request")}) == 2, "one worker took every turn"
    finally:
        server.stop()


def test_the_readme_capacity_bench_command_runs(tmp_path) -> None:
    """The README's command, as printed, with small numbers added (the last value of an option wins)."""
    line = next((ln.strip() for ln in README.splitlines() if ln.strip().startswith(".venv/bin/python bench/serve_capacity.py")),
                None)
    assert line, "the README shows no capacity bench command"
    args = line.split()[1:] + ["--streams", "20", "--chunks", "10", "--ramp", "0.5"]
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "FLOWRUNNER_API_KEY"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {m.group(1).strip(): m.group(2) for m in re.finditer(r"^(upstream \(the floor\)|flowrunner serve, \d+ workers?|"
                                                               r"LiteLLM proxy)\s+(.*)$", out.stdout, re.M)}
    assert "upstream (the floor)" in rows and "flowrunner serve, 1 worker" in rows, out.stdout
    assert "streams failed" not in out.stdout and "every stream failed" not in out.stdout, out.stdout
    assert re.search(r"pinned .*upstream and load client on cores? [\d,]+; serve on cores? [\d,]+", out.stdout)
    assert "LiteLLM" in out.stdout  # measured, or a line saying why not


# --- the per-chunk path (capacity) ------------------------------------------------------------------

SSE_LINES = ['data: {"a":1}', 'data:{"b":2}', "data:  two spaces", "data", "data:", ": keep-alive", "event: ping",
             "id: 7", "retry: 10", "data: [DONE]", "dat", "data: é日本", "data:a:b", "", "x: y", ":"]


@settings(max_examples=400, deadline=None)
@given(events=st.lists(st.lists(st.sampled_from(SSE_LINES), min_size=1, max_size=3), max_size=6),
       eol=st.sampled_from(["\n", "\r\n", "\r"]), tail=st.sampled_from(["", *SSE_LINES]),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_the_sse_reader_finds_the_events_httpx2_finds(events, eol, tail, cuts) -> None:
    """sse.Events (serve's and the chat step's reader of the model's stream) against httpx2's
    EventSource, on the same text cut into the same pieces: line ends LF, CRLF or CR (one cut between
    CR and LF), comments, other fields, several data lines, an unfinished last event."""
    from flowrunner.llm.sse import Events

    text = "".join(eol.join(lines) + eol + eol for lines in events) + tail
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    response = httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=iter([p.encode() for p in pieces]),
                               request=httpx2.Request("POST", "http://model/v1/chat/completions"))
    theirs = [e.data for e in httpx2.EventSource(response) if e.data]
    reader = Events()
    ours = [d for p in pieces for d in reader.feed(p)] + reader.end()
    assert [d for d in ours if d] == theirs


@given(text=st.text())
def test_a_delta_is_encoded_as_json_dumps_encodes_it(text) -> None:
    from flowrunner.serve.openai_api import Shapes
    from flowrunner.serve.wire import json_text

    assert json_text(text) == json.dumps(text, ensure_ascii=False).encode()
    chunk = Shapes("m").content_chunk(text)
    assert json.loads(chunk.removeprefix(b"data: "))["choices"][0]["delta"] == {"content": text}
