"""`flowrunner serve`: the flow as an OpenAI-compatible chat-completions endpoint (Starlette).

POST /v1/chat/completions   stream true (SSE) or false; the flow's text deltas become chunks at once
GET  /v1/models             the served flow, as a model
GET  /healthz               liveness

A client that disconnects cancels its run, which closes the model's stream upstream.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import secrets
from ..conversation import ChatInputs
from ..engine import Run
from ..errors import FlowDefinitionError, FlowError
from ..files import DEFAULT_MAX_BODY
from ..llm.errors import RETRY_AFTER_HEADERS
from .answer import END, Answer
from .limits import read_body
from .openai_api import DONE, KEEPALIVE, BadRequest, Shapes, error_body, parse_request, read_json

log = structlog.get_logger("flowrunner.serve")

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # nginx and friends: pass each chunk on, do not buffer
CLIENT_GONE = 499  # nginx's code for "the client closed the request"; only ever in our logs


@dataclass
class Served:
    chat: ChatInputs
    connections: Any  # connections.pool.Connections, shared by every request
    api_key: str | None = None
    keepalive: float = 15.0  # seconds of silence before a `: keep-alive` comment
    max_body_size: int = DEFAULT_MAX_BODY  # bytes; a larger request is a 413
    started: int = 0
    active: set[Answer] = field(default_factory=set)  # runs in flight: stopped when the server shuts down

    @property
    def name(self) -> str:
        return self.chat.flow.name


def create_app(served: Served) -> Starlette:
    served.started = served.started or int(time.time())

    async def models(request: Request) -> Response:
        request.state.started = time.monotonic()
        _authorize(request, served)
        _log_request(request, 200)
        return JSONResponse({"object": "list", "data": [_model(served)]})

    async def model(request: Request) -> Response:
        request.state.started = time.monotonic()
        _authorize(request, served)
        if request.path_params["model"] != served.name:
            raise BadRequest(f"The model '{request.path_params['model']}' does not exist", "model", 404,
                             code="model_not_found")
        _log_request(request, 200)
        return JSONResponse(_model(served))

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "flow": served.name})

    async def completions(request: Request) -> Response:
        request.state.started = started = time.monotonic()
        _authorize(request, served)
        body = read_json(await read_body(request, served.max_body_size))
        req = parse_request(body, request.headers.get("x-conversation-id"))
        try:
            inputs, client_history = served.chat.turn(req.text, conversation_id=req.conversation_id,
                                                      earlier=req.earlier, extra=req.inputs)
        except FlowDefinitionError as e:
            raise BadRequest("; ".join(p.message for p in e.problems), "inputs") from None
        # Cancelled (the client left, or the server is shutting down), the run stops at once: no one reads
        # the rest of the answer, and a client told to send the request again must not find the turn
        # saved half (a conversation it names); with the client's own history nothing is saved anyway.
        run = Run(served.chat.flow, inputs, connections=served.connections, client_history=client_history,
                  grace_on_cancel=False)
        shapes = Shapes(served.name)
        answer = Answer(run).start()
        served.active.add(answer)
        answer.task.add_done_callback(lambda _task: served.active.discard(answer))  # type: ignore[union-attr]
        gone = asyncio.create_task(_disconnected(request))
        handed_over = False
        try:
            if req.stream:
                first = await _first(answer, gone, served.keepalive)
            else:
                await asyncio.wait({answer.task, gone}, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[arg-type]
                first = END
            if gone.done():
                await answer.cancel()
                _log(answer, CLIENT_GONE, req.stream, started)
                return Response(status_code=CLIENT_GONE)
            if first is END:
                await answer.wait()
                # A plain answer that broke half-way is a failure too: never a 200 that claims "stop".
                if answer.failure is not None and (not answer.parts or not req.stream):
                    status, payload = _failure(answer.failure)
                    _log(answer, status, req.stream, started)
                    return JSONResponse(payload, status, headers=_retry_after(answer.failure))
                if not req.stream:
                    _log(answer, 200, False, started)
                    return JSONResponse(shapes.completion(answer.text, answer.finish_reason or "stop", answer.usage,
                                                          answer.refusal))
            handed_over = True  # the stream owns the run and the disconnect watch from here
            return EventStream(answer, shapes, first, gone, req.include_usage, served.keepalive, started)
        finally:
            if not handed_over:
                gone.cancel()
                await answer.cancel()

    async def bad_request(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, BadRequest):  # registered for BadRequest only
            raise exc
        _log_request(request, exc.status, exc.message)
        return JSONResponse(exc.body(), exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = "Not found: flowrunner serves /v1/chat/completions, /v1/models and /healthz" if status == 404 \
            else str(getattr(exc, "detail", "")) or "error"
        _log_request(request, status, message)
        return JSONResponse(error_body(message, "invalid_request_error"), status)

    return Starlette(
        routes=[Route("/v1/chat/completions", _guarded(completions), methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/models/{model:path}", model, methods=["GET"]),
                Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={BadRequest: bad_request, HTTPException: http_error},
    )


class EventStream(Response):
    """The SSE body: the role chunk, then the deltas. Those that queued up before the model's stream
    began go out in one write; from then on the run's task writes each delta itself as it arrives
    (Answer.deliver), while this one sends keep-alive comments in silences. Then the finish chunk,
    usage when asked, and [DONE]. A failure after the first byte is an `error` event (the SDKs raise it)."""

    def __init__(self, answer: Answer, shapes: Shapes, first: str | None | object, gone: asyncio.Task[None],
                 include_usage: bool, keepalive: float, started: float) -> None:
        super().__init__()
        self.answer, self.shapes, self.first, self.gone = answer, shapes, first, gone
        self.include_usage, self.keepalive, self.started = include_usage, keepalive, started
        self.last_write = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = asyncio.create_task(self._body(send))
        status = 200
        try:
            await asyncio.wait({body, self.gone}, return_when=asyncio.FIRST_COMPLETED)
            if not body.done():  # the client went away: stop the run, which closes the model stream
                status = CLIENT_GONE
                body.cancel()
                with suppress(asyncio.CancelledError, OSError):
                    await body
            else:
                with suppress(OSError):  # a client that left mid-write
                    body.result()
        finally:
            self.gone.cancel()
            body.cancel()
            await self.answer.cancel()
            _log(self.answer, status, True, self.started)

    async def _write(self, send: Any, data: bytes) -> None:
        self.last_write = time.monotonic()
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _deliver(self, send: Any, text: str) -> None:
        """Called by the run's task. A client that left mid-write: the disconnect watch ends the run."""
        with suppress(OSError):
            await self._write(send, self.shapes.content_chunk(text))

    async def _keep_alive(self, send: Any) -> None:
        """Until the run ends: a keep-alive comment after each `keepalive` seconds without a write."""
        task = self.answer.task
        while not task.done():  # type: ignore[union-attr]
            quiet = time.monotonic() - self.last_write
            if quiet >= self.keepalive:
                await self._write(send, KEEPALIVE)
                continue
            await asyncio.wait({task}, timeout=self.keepalive - quiet)  # type: ignore[arg-type]

    async def _body(self, send: Any) -> None:
        answer, shapes, queue = self.answer, self.shapes, self.answer.queue
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*SSE_HEADERS, (b"x-flowrunner-run-id", answer.run.run_id.encode())]})
        data, item = shapes.role_chunk(), self.first
        while True:
            while True:  # what has queued up goes out in one write
                if isinstance(item, str):
                    data += shapes.content_chunk(item)
                if item is END or queue.empty():
                    break
                item = queue.get_nowait()
            if data:
                await self._write(send, data)
                data = b""
            if item is END:
                break
            if not queue.empty():  # more came in during the write
                item = queue.get_nowait()
                continue
            if answer.streaming:  # the model streams: from here on the run's task writes each delta
                answer.deliver = lambda text: self._deliver(send, text)
                await self._keep_alive(send)
                break
            try:
                async with asyncio.timeout(self.keepalive):
                    item = await queue.get()
            except TimeoutError:
                item, data = _WAITING, KEEPALIVE
        await answer.wait()
        failure = answer.failure
        if failure is None and not answer.parts and answer.text:  # a flow with no chat step: its outputs
            await send({"type": "http.response.body", "body": shapes.content_chunk(answer.text), "more_body": True})
        if failure is not None:
            status, payload = _failure(failure)
            error = payload["error"]
            tail = shapes.error_event(error["message"], error["type"], error["code"])
        else:
            # The model's refusal, in one piece at the end (the flow's steps see it once the step ends).
            tail = shapes.refusal_chunk(answer.refusal) if answer.refusal else b""
            tail += shapes.finish_chunk(answer.finish_reason or "stop")
            if self.include_usage:
                tail += shapes.usage_chunk(answer.usage)
            tail += DONE
        await send({"type": "http.response.body", "body": tail, "more_body": False})


_WAITING = object()  # no delta yet: the response has started, the run has not spoken


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A failure of serve's own (a bug) is an OpenAI-shaped 500 and one log line, not starlette's
    plain-text 500 with a traceback (that comes with --debug)."""
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except (BadRequest, HTTPException):
            raise
        except Exception as e:  # noqa: BLE001 - the client still gets an answer it can parse
            message = secrets.redact(f"the request failed in flowrunner serve: {type(e).__name__}: {e}")
            log.error("request failed", error=message)
            log.debug("request failed", exc_info=True)
            _log_request(request, 500, message)
            return JSONResponse(error_body(message, "server_error"), 500)
    return guarded


async def _first(answer: Answer, gone: asyncio.Task[None], wait: float) -> str | None | object:
    """STARTED (the model accepted the request), the first delta, END, or _WAITING after `wait` seconds
    (the response then starts, so keep-alive comments can hold the connection open through a slow
    retrieval). Until then a failure (a bad input, the model's 429...) is still an HTTP error status;
    after, an error event. The head goes out while the model thinks, so the first token is one write."""
    get = asyncio.ensure_future(answer.queue.get())
    try:
        await asyncio.wait({get, gone}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    return get.result() if get.done() and not get.cancelled() else _WAITING


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _authorize(request: Request, served: Served) -> None:
    if served.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), served.api_key.encode()):
        raise BadRequest("Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY",
                         None, 401, code="invalid_api_key")


def _failure(error: FlowError) -> tuple[int, dict[str, Any]]:
    status = getattr(error, "http_status", 500)
    if isinstance(error, FlowDefinitionError):
        status = 500  # the flow's own set-up (a missing env var...), not the client's request
    kind = {400: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
    message = secrets.redact("; ".join(p.message for p in error.problems))
    return status, error_body(message, kind, None, "rate_limit_exceeded" if status == 429 else None)


_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,63}")  # a plain, short header value: nothing to smuggle


def _retry_after(error: FlowError) -> dict[str, str] | None:
    """A 429's Retry-After (and retry-after-ms, which the openai SDKs prefer) as the model's server
    sent them; with only retry-after-ms, Retry-After is its seconds, rounded up."""
    given = getattr(error, "http_headers", None)
    if getattr(error, "http_status", None) != 429 or not given:
        return None
    out = {k: v for k, v in given.items() if k in RETRY_AFTER_HEADERS and _HEADER_VALUE.fullmatch(v)}
    if "retry-after" not in out and "retry-after-ms" in out:
        try:
            out["retry-after"] = str(max(0, math.ceil(float(out["retry-after-ms"]) / 1000)))
        except (ValueError, OverflowError):  # nan, inf: no Retry-After of ours either
            pass
    return out or None


def _model(served: Served) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": served.started, "owned_by": "flowrunner"}


def _log(answer: Answer, status: int, stream: bool, started: float) -> None:
    """The one `request` line of a chat completion (info: shown at the default level, see command.py)."""
    usage, first = answer.usage, answer.first_token_at
    log.info("request", status=status, stream=stream, duration=round(time.monotonic() - started, 3),
             ttft=None if first is None else round(first - started, 3), prompt_tokens=usage.get("prompt_tokens"),
             completion_tokens=usage.get("completion_tokens"), total_tokens=usage.get("total_tokens"),
             usage=answer.usage_source, run_id=answer.run.run_id)


def _log_request(request: Request, status: int, error: str | None = None) -> None:
    """The `request` line of a request that ran no flow: a refused one, /v1/models."""
    started = getattr(request.state, "started", None)
    fields: dict[str, Any] = {"path": request.url.path} if request.url.path != "/v1/chat/completions" else {}
    log.info("request", status=status, **fields,
             duration=None if started is None else round(time.monotonic() - started, 3),
             **({"error": error} if error else {}))
