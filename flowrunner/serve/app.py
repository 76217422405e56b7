"""`flowrunner serve`: the flow as an OpenAI-compatible chat-completions endpoint (Starlette).

POST /v1/chat/completions   stream true (SSE) or false; the flow's text deltas become chunks at once
POST /v1/responses          the same, in the Responses API's shapes (responses_api.py)
GET  /v1/models             the served flow, as a model
GET  /healthz               readiness: 503 while the server drains (drain.py)

A client that disconnects cancels its run, which closes the model's stream upstream.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Awaitable, Callable
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
from ..errors import FlowDefinitionError
from ..files import DEFAULT_MAX_BODY
from .admission import Admission, Refused
from .answer import END, Answer
from .cors import with_cors
from .limits import read_body
from .openai_api import BadRequest, Shapes, error_body, parse_request, read_json
from .outcome import failure as _failure
from .outcome import log_request as _log_request
from .outcome import log_run as _log
from .outcome import retry_after as _retry_after
from .responses_api import ResponsesShapes, parse_responses_request
from .stream import CLIENT_GONE, EventStream, disconnected, first_item

log = structlog.get_logger("flowrunner.serve")


@dataclass
class Served:
    chat: ChatInputs
    connections: Any  # connections.pool.Connections, shared by every request
    api_key: str | tuple[str, ...] | None = None  # several: each client its own (admission.py limits each)
    keepalive: float = 15.0  # seconds of silence before a `: keep-alive` comment
    max_body_size: int = DEFAULT_MAX_BODY  # bytes; a larger request is a 413
    started: int = 0
    active: set[Answer] = field(default_factory=set)  # runs in flight: stopped when the server shuts down
    admission: Admission | None = None  # --max-concurrent-streams and the per-key limits
    cors_origins: tuple[str, ...] = ()  # --cors-origin: off when empty
    draining: bool = False  # SIGTERM: new requests get 503 while the runs in flight finish (drain.py)

    @property
    def keys(self) -> tuple[str, ...]:
        key = self.api_key
        return () if not key else (key,) if isinstance(key, str) else tuple(key)

    @property
    def name(self) -> str:
        return self.chat.flow.name


def create_app(served: Served) -> Any:
    """The ASGI app: Starlette's, behind the CORS layer when --cors-origin is given."""
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
        if served.draining:  # not ready: a load balancer sends the next request elsewhere
            return JSONResponse({"status": "draining", "flow": served.name, "pid": os.getpid()}, 503,
                                headers={"retry-after": "1"})  # no `connection: close`: a probe's connection stays
        # pid: which process answered (serve --workers: each worker is one)
        return JSONResponse({"status": "ok", "flow": served.name, "pid": os.getpid()})

    def endpoint(parse: Callable[[Any, Any, ChatInputs], Any],
                 make_shapes: Callable[[str, Any], Any]) -> Callable[[Request], Awaitable[Response]]:
        """A handler that runs the flow for one turn: chat completions and the Responses API differ
        only in how the request is read (`parse`) and the shapes of the answer (`make_shapes`)."""
        async def handle(request: Request) -> Response:
            return await _turn(request, parse, make_shapes)
        return handle

    async def _turn(request: Request, parse: Callable[[Any, Any, ChatInputs], Any],
                    make_shapes: Callable[[str, Any], Any]) -> Response:
        request.state.started = started = time.monotonic()
        path = request.url.path
        key = _authorize(request, served)
        if served.draining:
            raise Refused("the server is shutting down: send the request again", 503, "server_error",
                          "server_shutting_down", _DRAINING_HEADERS)
        body = read_json(await read_body(request, served.max_body_size))
        req = parse(body, request.headers, served.chat)
        try:
            inputs, client_history = served.chat.turn(req.text, conversation_id=req.conversation_id,
                                                      earlier=req.earlier, extra=req.inputs,
                                                      images=getattr(req, "images", None))
        except FlowDefinitionError as e:
            raise BadRequest("; ".join(p.message for p in e.problems), "inputs") from None
        # Cancelled (the client left, or the server is shutting down), the run stops at once: no one reads
        # the rest of the answer, and a client told to send the request again must not find the turn
        # saved half (a conversation it names); with the client's own history nothing is saved anyway.
        run = Run(served.chat.flow, inputs, connections=served.connections, client_history=client_history,
                  grace_on_cancel=False)
        shapes = make_shapes(served.name, req)
        # Or a 429. Counted in last, right before the run's task that counts it out: nothing between can fail.
        release = served.admission.admit(key) if served.admission is not None else None
        answer = Answer(run).start()
        served.active.add(answer)
        answer.task.add_done_callback(lambda _task: served.active.discard(answer))  # type: ignore[union-attr]
        if release is not None:
            answer.task.add_done_callback(release)  # type: ignore[union-attr]
        gone = asyncio.create_task(disconnected(request))
        handed_over = False
        try:
            if req.stream:
                first = await first_item(answer, gone, served.keepalive)
            else:
                await asyncio.wait({answer.task, gone}, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[arg-type]
                first = END
            if gone.done():
                await answer.cancel()
                _log(answer, CLIENT_GONE, req.stream, started, path)
                return Response(status_code=CLIENT_GONE)
            if first is END:
                await answer.wait()
                # A plain answer that broke half-way is a failure too: never a 200 that claims "stop".
                if answer.failure is not None and (not answer.parts or not req.stream):
                    status, payload = _failure(answer.failure)
                    _log(answer, status, req.stream, started, path)
                    return JSONResponse(payload, status, headers=_retry_after(answer.failure))
                if not req.stream:
                    _log(answer, 200, False, started, path)
                    thinking = {"reasoning": "".join(answer.reasoning)} if answer.reasoning and hasattr(
                        shapes, "reasoning_chunk") else {}  # message.reasoning_content, where the protocol has it
                    return JSONResponse(shapes.completion(answer.text, answer.finish_reason or "stop", answer.usage,
                                                          answer.refusal, **thinking))
            handed_over = True  # the stream owns the run and the disconnect watch from here
            return EventStream(answer, shapes, first, gone, req.include_usage, served.keepalive, started, path)
        finally:
            if not handed_over:
                gone.cancel()
                await answer.cancel()

    async def bad_request(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, BadRequest):  # registered for BadRequest only
            raise exc
        _log_request(request, exc.status, exc.message)
        return JSONResponse(exc.body(), exc.status, headers=getattr(exc, "headers", None))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        message = "Not found: flowrunner serves /v1/chat/completions, /v1/responses, /v1/models and /healthz" \
            if status == 404 \
            else str(getattr(exc, "detail", "")) or "error"
        _log_request(request, status, message)
        return JSONResponse(error_body(message, "invalid_request_error"), status)

    chat = endpoint(lambda body, headers, chat_inputs: parse_request(body, headers.get("x-conversation-id"),
                                                                     images=chat_inputs.images is not None),
                    lambda name, _req: Shapes(name))
    responses = endpoint(parse_responses_request, ResponsesShapes)
    app = Starlette(
        routes=[Route("/v1/chat/completions", _guarded(chat), methods=["POST"]),
                Route("/v1/responses", _guarded(responses), methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/models/{model:path}", model, methods=["GET"]),
                Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={BadRequest: bad_request, HTTPException: http_error},
    )
    return with_cors(app, served.cors_origins)


_DRAINING_HEADERS = {"retry-after": "1", "connection": "close"}  # go elsewhere: this process is ending


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


def _authorize(request: Request, served: Served) -> int | None:
    """The index of the client's key among --api-key's (its limits are its own); None: no key needed."""
    keys = served.keys
    if not keys:
        return None
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    sent = token.strip().encode()
    # Every key is compared, in constant time each: how long a refusal takes says nothing of which key is near.
    matches = [i for i, key in enumerate(keys) if hmac.compare_digest(sent, key.encode())]
    if scheme.lower() == "bearer" and matches:
        return matches[0]
    raise BadRequest("Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY",
                     None, 401, code="invalid_api_key")


def _model(served: Served) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": served.started, "owned_by": "flowrunner"}
