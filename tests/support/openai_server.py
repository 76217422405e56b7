"""A real HTTP/1.1 server that speaks the OpenAI and Azure OpenAI chat/embeddings protocol byte for byte.

Built on raw asyncio streams rather than an HTTP framework so that tests control every byte: chunk
boundaries, aborted chunked bodies, stalls, malformed SSE lines. It runs its own event loop in a
background thread, so sync and async clients in the test thread can both talk to it.

    with OpenAIServer() as server:
        server.script(Reply(text="Hi there"), Reply(status=429, retry_after=0))
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")

Standalone (benchmarks, tests that need another process):
    python -m tests.support.openai_server [--port N] [--chunk-delay S] [--text "..."]
prints the base_url as its first stdout line and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import json
import re
import secrets
import signal
import threading
import time
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from .openai_script import (DEFAULT_TEXT, DONE_EVENT, KEEPALIVE_EVENT, ChatRender, RecordedRequest, Reply,
                            StreamPlan, auth_error_response, azure_error_body, embeddings_response, error_body,
                            models_response)

__all__ = ["OpenAIServer", "RecordedRequest", "Reply", "main"]

_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")
_MAX_HEADER_LINES = 200
_POLL = 0.01  # how often a long pause (stall) looks for a client that went away
_POLL_ABOVE = 0.05
HOLD_LIMIT = 30.0  # seconds a Reply.hold waits for its event before the server gives up (and records it)


class _ClientGone(Exception):
    """The client closed its side while we were still sending the stream."""


class _BadRequest(Exception):
    pass


Responder = Callable[[RecordedRequest], "Reply | None"]


class OpenAIServer:
    """The test server. Scripted replies are consumed in order by chat requests, then the responder, then the default."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, default_reply: Reply | None = None,
                 require_key: str | None = None) -> None:
        self.host = host
        self._requested_port = port
        self._initial_default = default_reply or Reply(text=DEFAULT_TEXT)
        self._initial_require_key = require_key
        self.default_reply: Reply = self._initial_default
        self.require_key: str | None = require_key  # None accepts any non-empty key
        self.responder: Responder | None = None
        self.deployments: set[str] | None = None  # Azure deployments that exist; None: all
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # exceptions raised by `responder`
        self._queue: collections.deque[Reply] = collections.deque()
        self._cond = threading.Condition()
        self._disconnects = 0
        self.disconnected = threading.Event()  # set at the first client disconnect since reset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = 0
        self.port: int = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OpenAIServer:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="openai-test-server", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, self._requested_port), loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = self._server = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        # Python 3.11's Server.close() leaves live connections alone; stalled streams would hang on.
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- scripting and observation (called from the test thread) -----------------------------

    def script(self, *replies: Reply) -> OpenAIServer:
        with self._cond:
            self._queue.extend(replies)
        return self

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        with self._cond:
            return len(self._queue)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.kind == "chat"]

    @property
    def embedding_requests(self) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.kind == "embeddings"]

    @property
    def disconnects(self) -> int:
        with self._cond:
            return self._disconnects

    def wait_for_disconnect(self, timeout: float = 2.0, count: int = 1) -> bool:
        """True once at least `count` client disconnects were seen (detection is asynchronous)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._disconnects >= count, timeout=timeout)

    def wait_for_requests(self, count: int, timeout: float = 2.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= count, timeout=timeout)

    def reset(self) -> None:
        with self._cond:
            self._queue.clear()
            self.requests.clear()
            self.errors.clear()
            self._disconnects = 0
            self.disconnected.clear()
        self.default_reply = self._initial_default
        self.require_key = self._initial_require_key
        self.responder = None
        self.deployments = None

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
        if self.responder is not None:
            try:
                reply = self.responder(request)
            except Exception as exc:  # a test bug: answer 500 (not retried) so the test sees it, and keep it
                self.errors.append(exc)
                return Reply(status=500, error=f"responder raised {exc!r}", headers={"x-should-retry": "false"})
            if reply is not None:
                return reply
        return self.default_reply

    def _count_disconnect(self) -> None:
        with self._cond:
            self._disconnects += 1
            self.disconnected.set()
            self._cond.notify_all()

    # --- HTTP --------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._connections += 1
        connection = self._connections
        try:
            while True:  # keep-alive: the SDK reuses the connection for the next request
                try:
                    request = await self._read_request(reader)
                except _BadRequest as exc:
                    writer.write(self._response(400, {"error": {"message": str(exc)}}, close=True))
                    break
                if request is None:
                    break
                request.connection = connection
                with self._cond:
                    self.requests.append(request)
                    self._cond.notify_all()
                close = request.headers.get("connection", "").lower() == "close"
                keep = await self._dispatch(request, reader, writer, close)
                await writer.drain()
                if not keep or close:
                    break
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _read_request(self, reader: asyncio.StreamReader) -> RecordedRequest | None:
        line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(f"bad request line {line!r}")
        method, target, _version = parts
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest(f"bad header line {raw!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        else:
            raise _BadRequest("too many headers")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest("chunked request bodies are not supported by this test server")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise _BadRequest("bad content-length") from exc
        raw_body = await reader.readexactly(length) if length > 0 else b""
        body: Any = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body = None
        url = urlsplit(target)
        path = unquote(url.path)
        azure_match = _AZURE_DEPLOYMENT.match(path)
        if path == "/v1/chat/completions" or (azure_match and azure_match.group(2) == "chat/completions"):
            kind = "chat"
        elif path == "/v1/embeddings" or (azure_match and azure_match.group(2) == "embeddings"):
            kind = "embeddings"
        elif path.startswith(("/v1/models", "/openai/models")):
            kind = "models"
        else:
            kind = "other"
        return RecordedRequest(method=method, path=path, query=dict(parse_qsl(url.query)), headers=headers,
                               body=body, raw_body=raw_body, received_at=time.monotonic(), kind=kind,
                               azure=path.startswith("/openai/"),
                               deployment=azure_match.group(1) if azure_match else None)

    def _response(self, status: int, body: Any, *, close: bool = False, azure: bool = False,
                  headers: dict[str, str] | None = None) -> bytes:
        payload = json.dumps(body, separators=(",", ":")).encode()
        extra = {"content-type": "application/json", "content-length": str(len(payload))}
        return self._head(status, {**extra, **(headers or {})}, close=close, azure=azure) + payload

    def _head(self, status: int, headers: dict[str, str], *, close: bool, azure: bool) -> bytes:
        request_id = secrets.token_hex(16)
        base = {"date": email.utils.formatdate(usegmt=True), "x-request-id": f"req_{request_id}",
                "openai-processing-ms": "1", "connection": "close" if close else "keep-alive"}
        if azure:
            base["apim-request-id"] = request_id
        else:
            base["openai-version"] = "2020-10-01"
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        lines = [f"HTTP/1.1 {status} {phrase}"]
        lines += [f"{k}: {v}" for k, v in {**base, **headers}.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _dispatch(self, request: RecordedRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, close: bool) -> bool:
        """Answer one request; False means the connection must not be reused."""
        azure = request.azure

        def send(status: int, body: Any, headers: dict[str, str] | None = None) -> bool:
            writer.write(self._response(status, body, close=close, azure=azure, headers=headers))
            return True

        known = (request.kind in ("chat", "embeddings") and request.method == "POST") or (
            request.kind == "models" and request.method == "GET"
            and request.path in ("/v1/models", "/openai/models"))
        if not known:
            if azure:
                return send(404, azure_error_body("404", "Resource not found"))
            return send(404, error_body(404, f"Invalid URL ({request.method} {request.path})", code=None))
        if azure and "api-version" not in request.query:
            return send(404, azure_error_body("404", "Resource not found"))
        auth_error = auth_error_response(request, self.require_key)
        if auth_error is not None:
            return send(*auth_error)
        if azure and request.deployment and self.deployments is not None \
                and request.deployment not in self.deployments:
            return send(404, azure_error_body("DeploymentNotFound", "The API deployment for this resource "
                                              "does not exist. If you created the deployment within the last 5 "
                                              "minutes, please wait a moment and try again."))
        if request.kind == "models":
            return send(200, models_response())
        if not isinstance(request.body, dict):
            return send(400, error_body(400, "We could not parse the JSON body of your request.", code=None))
        if request.kind == "embeddings":
            return send(*embeddings_response(request.body, request.deployment))
        if not isinstance(request.body.get("messages"), list):
            return send(400, error_body(400, "Missing required parameter: 'messages'.", param="messages",
                                        code="missing_required_parameter"))
        reply = self._next_reply(request)
        if reply.hold is not None:
            await self._hold(reply.hold, reader)
        render = ChatRender(reply, request.body, azure=azure, deployment=request.deployment)
        if reply.status >= 300:
            headers = dict(reply.headers)
            if reply.retry_after is not None:
                headers["retry-after"] = str(reply.retry_after)
            if reply.retry_after_ms is not None:
                headers["retry-after-ms"] = str(reply.retry_after_ms)
            return send(reply.status, error_body(reply.status, reply.error), headers)
        if request.body.get("stream") is not True or reply.not_sse:
            if reply.stall_after is not None and reply.stall > 0:
                await asyncio.sleep(reply.stall)
            return send(200, render.completion(), dict(reply.headers))
        return await self._stream(reader, writer, reply, render.stream_plan(), close=close, azure=azure)

    async def _hold(self, event: threading.Event, reader: asyncio.StreamReader) -> None:
        """Reply.hold: wait for the test's event without blocking the other connections."""
        deadline = time.monotonic() + HOLD_LIMIT
        while not event.is_set():
            if reader.at_eof():
                return
            if time.monotonic() > deadline:
                self.errors.append(TimeoutError(f"a held reply was not released within {HOLD_LIMIT:g} s"))
                return
            await asyncio.sleep(_POLL)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: Reply,
                      plan: StreamPlan, *, close: bool, azure: bool) -> bool:
        headers = {"content-type": "text/event-stream; charset=utf-8", "transfer-encoding": "chunked",
                   "cache-control": "no-cache", **reply.headers}
        writer.write(self._head(200, headers, close=close, azure=azure))

        def client_gone() -> bool:
            return reader.at_eof() or reader.exception() is not None or writer.transport.is_closing()

        async def emit(data: bytes) -> None:
            if client_gone():
                raise _ClientGone
            # One HTTP chunk per SSE event, flushed at once: what a real streaming proxy does.
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                await writer.drain()
            except ConnectionError as exc:
                raise _ClientGone from exc

        async def pause(seconds: float) -> None:
            if seconds <= _POLL_ABOVE:
                # Pacing delays sleep in one go (cheap under benchmark load); emit() checks the client next.
                await asyncio.sleep(seconds)
                return
            deadline = time.monotonic() + seconds
            while True:
                if client_gone():
                    raise _ClientGone
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                await asyncio.sleep(min(left, _POLL))

        due = time.monotonic()  # paced: when the last event was due

        async def between() -> None:
            nonlocal due
            if reply.chunk_delay > 0 and reply.paced:
                due += reply.chunk_delay
                await pause(due - time.monotonic())
            elif reply.chunk_delay > 0:
                await pause(reply.chunk_delay)
            else:
                await asyncio.sleep(0)  # let other connections and EOF callbacks run between events
            if reply.keepalive:
                await emit(KEEPALIVE_EVENT)

        def at(knob: int | None, position: int) -> bool:
            # A position past the end fires just before [DONE], so a fault is never silently skipped.
            return knob is not None and min(knob, len(plan.body)) == position

        try:
            for index, event in enumerate(plan.head):
                if index:
                    await between()
                await emit(event)
            for position in range(len(plan.body) + 1):
                if at(reply.stall_after, position):
                    await pause(reply.stall)
                if at(reply.malformed_after, position):
                    await emit(plan.malformed)
                if at(reply.error_after, position):
                    await emit(plan.error_event)
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return True
                if at(reply.disconnect_after, position):
                    await writer.drain()
                    writer.close()  # FIN in the middle of the chunked body: an incomplete message
                    return False
                if position == len(plan.body):
                    break
                await between()
                await emit(plan.body[position])
            await between()
            if client_gone():
                raise _ClientGone
            # [DONE] and the last-chunk marker go out in one write: a client that closes right after
            # [DONE] then never looks like a mid-stream disconnect.
            tail = b"%x\r\n%s\r\n" % (len(DONE_EVENT), DONE_EVENT) if plan.done else b""
            writer.write(tail + b"0\r\n\r\n")
            await writer.drain()
            if reply.sent is not None:
                reply.sent.set()
            return True
        except (_ClientGone, ConnectionError):
            self._count_disconnect()
            return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.openai_server",
                                     description="Local OpenAI / Azure OpenAI protocol server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between SSE events")
    parser.add_argument("--paced", action="store_true",
                        help="--chunk-delay is a schedule: a busy server keeps the pace (Reply.paced)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the text every chat request gets")
    parser.add_argument("--require-key", default=None, help="demand this API key")
    args = parser.parse_args(argv)
    server = OpenAIServer(args.host, args.port, require_key=args.require_key,
                          default_reply=Reply(text=args.text, chunk_delay=args.chunk_delay, paced=args.paced))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        print(server.base_url, flush=True)
        # A timed wait so the main thread gets back to the interpreter and runs the signal handler.
        while not stopping.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
