"""Issue 16: `flowrunner serve` in front of browsers and many clients: CORS (`--cors-origin`), the
limits per process and per key (`--max-concurrent-streams`, `--max-streams-per-key`,
`--rate-limit-per-key`), and the graceful drain on SIGTERM (`--grace`). The real CLI in a child
process, real HTTP clients, the local OpenAI-protocol test server as the flow's model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import httpx2
import openai
import pytest

from tests.conftest import ROOT
from tests.support.fixtures import Reply
from tests.test_serve import CHAT_FLOW, serve, text_of, user  # noqa: F401

STALLED = dict(stall_after=1, stall=600)  # one delta, then silence until the client hangs up
APP, VITE = "https://app.example.com", "http://localhost:5173"


def preflight(server, origin: str, path: str = "/chat/completions") -> httpx2.Response:
    return httpx2.options(f"{server.url}{path}", timeout=30, headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os"})


def chat_body(stream: bool = True) -> dict:
    return {"model": "m", "messages": user("q"), "stream": stream}


def held_stream(stack: ExitStack, server, key: str | None = None) -> tuple[httpx2.Response, Iterator[str]]:
    """A streaming request, open until `stack` closes, read up to its first delta (its run is in flight);
    with its lines, which the caller keeps (a dropped line iterator closes the response)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = stack.enter_context(httpx2.stream("POST", f"{server.url}/chat/completions", json=chat_body(),
                                                 headers=headers, timeout=30))
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    while '"Held"' not in next(lines):
        pass
    return response, lines


# --- CORS -------------------------------------------------------------------------------------------

def test_cors_is_off_by_default(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    answer = preflight(server, APP)
    assert answer.status_code == 405 and not [h for h in answer.headers if h.startswith("access-control")]
    reply = httpx2.post(f"{server.url}/chat/completions", json=chat_body(False), headers={"origin": APP}, timeout=30)
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def test_preflight_from_an_allowed_origin_and_from_another(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--cors-origin", APP, "--cors-origin", VITE)
    for origin, path in ((APP, "/chat/completions"), (VITE, "/responses")):
        answer = preflight(server, origin, path)
        assert answer.status_code == 204, answer.text
        assert answer.headers["access-control-allow-origin"] == origin
        assert "POST" in answer.headers["access-control-allow-methods"]
        allowed = {h.strip() for h in answer.headers["access-control-allow-headers"].lower().split(",")}
        assert {"authorization", "content-type", "x-stainless-os"} <= allowed
        assert int(answer.headers["access-control-max-age"]) > 0 and answer.headers["vary"] == "Origin"
    refused = preflight(server, "https://evil.example.net")
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert refused.json()["error"]["code"] == "origin_not_allowed"
    assert llm.chat_requests == []


def test_cors_headers_on_a_stream_a_plain_answer_and_an_error(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--cors-origin", APP)
    llm.script(Reply(text=["Cross", " origin"]), Reply(text="plain"))
    with httpx2.stream("POST", f"{server.url}/chat/completions", json=chat_body(), headers={"origin": APP},
                       timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["access-control-allow-origin"] == APP and response.headers["vary"] == "Origin"
        assert "retry-after" in response.headers["access-control-expose-headers"]
        data = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c["choices"]) == "Cross origin"
    plain = httpx2.post(f"{server.url}/responses", json={"input": "q"}, headers={"origin": APP}, timeout=30)
    assert plain.json()["output"][0]["content"][0]["text"] == "plain"
    assert plain.headers["access-control-allow-origin"] == APP
    bad = httpx2.post(f"{server.url}/chat/completions", content=b"{", timeout=30,
                      headers={"origin": APP, "content-type": "application/json"})
    assert bad.status_code == 400 and bad.headers["access-control-allow-origin"] == APP
    other = httpx2.post(f"{server.url}/chat/completions", json=chat_body(False), timeout=30,
                        headers={"origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in other.headers
    bare = httpx2.get(server.url.removesuffix("/v1") + "/healthz", timeout=30)
    assert "access-control-allow-origin" not in bare.headers  # no Origin: no browser, no CORS


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_not_sent_as_json_is_a_415_and_starts_no_run(serve, llm, content_type) -> None:
    """What a web page of any origin may POST without a preflight (a "simple" request: text/plain, a
    form, a Blob without a type) never starts a run, even on a server without --api-key."""
    server = serve(CHAT_FLOW, "--cors-origin", APP)
    headers = {"origin": "https://evil.example.net"} | ({"content-type": content_type} if content_type else {})
    for path, body in (("/chat/completions", chat_body(False)), ("/responses", {"input": "q"})):
        refused = httpx2.post(f"{server.url}{path}", content=json.dumps(body).encode(), headers=headers, timeout=30)
        assert refused.status_code == 415, refused.text
        assert refused.json()["error"]["code"] == "unsupported_media_type"
        assert "application/json" in refused.json()["error"]["message"]
        assert "access-control-allow-origin" not in refused.headers
    assert llm.chat_requests == []
    sent = httpx2.post(f"{server.url}/chat/completions", content=json.dumps(chat_body(False)).encode(), timeout=30,
                       headers={"content-type": "Application/JSON; charset=utf-8", "origin": APP})
    assert sent.status_code == 200 and sent.headers["access-control-allow-origin"] == APP


def test_any_origin_with_a_warning(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--cors-origin", "*")
    assert preflight(server, "https://anyone.example").headers["access-control-allow-origin"] == "*"
    assert "any web page may call this server, and it needs no --api-key" in server.stderr


@pytest.mark.parametrize("args,message", [
    (["--cors-origin", "https://app.example.com/chat"], "an origin has no path"),
    (["--cors-origin", "app.example.com"], "is not an origin"),
    (["--rate-limit-per-key", "5 per minute"], "is not a rate"),
    (["--rate-limit-per-key", "5rpm"], "--rate-limit-per-key limits each API key, and serve has none"),
    (["--max-streams-per-key", "2"], "--max-streams-per-key limits each API key"),
    (["--max-concurrent-streams", "0"], "--max-concurrent-streams"),
])
def test_bad_options_are_exit_2(tmp_path, args, message) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(CHAT_FLOW, encoding="utf-8")
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-x", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "flowrunner", "serve", str(flow), "--port", "0", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


# --- limits -----------------------------------------------------------------------------------------

def test_streams_beyond_the_limit_get_a_429_with_retry_after(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--max-concurrent-streams", "2")
    llm.script(*[Reply(text=["Held", " on"], **STALLED)] * 2, Reply(text="after"))
    with ExitStack() as stack:
        held = [held_stream(stack, server) for _ in range(2)]
        refused = httpx2.post(f"{server.url}/chat/completions", json=chat_body(), timeout=30)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "too_many_streams" and "2" in error["message"]
        with pytest.raises(openai.RateLimitError):  # the SDK sees it as a rate limit
            server.client().chat.completions.create(model=server.name, messages=user("q"))
        assert len(llm.chat_requests) == 2
        held[0][0].close()
        assert llm.wait_for_disconnect(timeout=10)
        # The closed stream's place is free again: the SDK, retrying as Retry-After says, gets in.
        reply = server.client(max_retries=5).chat.completions.create(model=server.name, messages=user("q"))
        assert reply.choices[0].message.content == "after"


def test_one_key_at_its_stream_limit_leaves_room_for_the_others(serve, llm) -> None:
    alice, bob = "sk-alice-key-0001", "sk-bob-key-0002"
    server = serve(CHAT_FLOW, "--api-key", alice, "--api-key", bob, "--max-streams-per-key", "1")
    llm.script(Reply(text=["Held", " on"], **STALLED), Reply(text="for bob"))
    with ExitStack() as stack:
        held = held_stream(stack, server, alice)  # noqa: F841 - open until the end of the block
        refused = httpx2.post(f"{server.url}/chat/completions", json=chat_body(False), timeout=30,
                              headers={"authorization": f"Bearer {alice}"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        assert "this API key" in refused.text and alice not in refused.text
        reply = server.client(api_key=bob).chat.completions.create(model=server.name, messages=user("q"))
        assert reply.choices[0].message.content == "for bob"
    assert alice not in server.stderr and bob not in server.stderr


def test_a_key_over_its_rate_gets_a_429_and_the_others_do_not(serve, llm) -> None:
    alice, bob = "sk-alice-key-0003", "sk-bob-key-0004"
    server = serve(CHAT_FLOW, "--rate-limit-per-key", "2rpm", "--max-concurrent-streams", "10",
                   "--api-key", f"{alice},{bob}")  # several keys in one value, as FLOWRUNNER_API_KEY holds them
    ask = lambda key: server.client(api_key=key).chat.completions.create(  # noqa: E731
        model=server.name, messages=user("q"))
    ask(alice), ask(alice)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(alice)
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
    assert caught.value.body["code"] == "rate_limit_exceeded" and alice not in caught.value.message
    assert ask(bob).choices[0].message.content
    assert len(llm.chat_requests) == 3
    with pytest.raises(openai.AuthenticationError):
        ask("sk-neither")
    assert alice not in server.stderr and bob not in server.stderr


# --- graceful drain ---------------------------------------------------------------------------------

def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_requests(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["Before", " the", " end"], stall_after=1, stall=5))
    base = server.url.removesuffix("/v1")
    with httpx2.Client(timeout=30) as kept:  # a kept-alive connection, open before the SIGTERM
        assert kept.get(f"{base}/healthz").json()["status"] == "ok"
        stream = server.client().chat.completions.create(model=server.name, messages=user("q"), stream=True)
        chunks = [next(c for c in stream if text_of([c]))]
        server.proc.send_signal(signal.SIGTERM)
        health = kept.get(f"{base}/healthz")
        while health.status_code == 200:  # until the signal is handled
            health = kept.get(f"{base}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert health.headers["retry-after"] == "1"
    with httpx2.Client(timeout=30) as late, pytest.raises(httpx2.ConnectError):
        while True:  # a 503 until the listener is closed: from then on no connection is accepted
            assert late.get(f"{base}/healthz").status_code == 503
    chunks += list(stream)
    assert text_of(chunks) == "Before the end" and chunks[-1].choices[0].finish_reason == "stop"
    assert server.wait(timeout=30) == 0, server.stderr
    assert "Traceback" not in server.stderr


def test_a_request_on_a_kept_alive_connection_during_the_drain_gets_503(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["Held", " on"], **STALLED))
    base = server.url.removesuffix("/v1")
    with ExitStack() as stack, httpx2.Client(timeout=30) as kept:
        assert kept.get(f"{base}/healthz").status_code == 200
        held = held_stream(stack, server)  # noqa: F841 - open until the end of the block
        server.proc.send_signal(signal.SIGTERM)
        while kept.get(f"{base}/healthz").status_code == 200:
            pass
        refused = kept.post(f"{server.url}/chat/completions", json=chat_body())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
    assert server.wait(timeout=30) == 0  # the held stream closed by its client: nothing left to wait for


def test_a_stream_longer_than_the_grace_ends_with_an_error_event(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--grace", "1")
    llm.script(Reply(text=["Held", " on"], **STALLED))
    stream = server.client().responses.create(model=server.name, input="q", stream=True)
    events = [next(e for e in stream if e.type == "response.output_text.delta")]
    server.proc.send_signal(signal.SIGTERM)
    events += list(stream)
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert "shutting down" in events[-1].response.error.message and events[-1].response.output_text == "Held"
    assert llm.wait_for_disconnect(timeout=10)
    assert server.wait(timeout=30) == 0 and "Traceback" not in server.stderr


def test_a_second_sigterm_ends_the_drain_at_once(serve, llm) -> None:
    server = serve(CHAT_FLOW, "--grace", "600")  # longer than any wait here: only the second signal ends it
    llm.script(Reply(text=["Held", " on"], **STALLED))
    base = server.url.removesuffix("/v1")
    with httpx2.Client(timeout=30) as kept:
        assert kept.get(f"{base}/healthz").status_code == 200
        stream = server.client().chat.completions.create(model=server.name, messages=user("q"), stream=True)
        chunks = [next(c for c in stream if text_of([c]))]
        server.proc.send_signal(signal.SIGTERM)
        while kept.get(f"{base}/healthz").status_code == 200:  # until the drain began
            pass
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):  # the stream's error event
        chunks += list(stream)
    assert text_of(chunks) == "Held"
    assert llm.wait_for_disconnect(timeout=10)
    code = server.wait(timeout=60)
    assert "Traceback" not in server.stderr and code == 0, (code, server.stderr)
