"""The streamed answer of `serve`, as server-sent events: the response body that a run's deltas go
out through (in the chat completions' or the Responses API's shapes), keep-alive comments in its
silences, and the end (the finish, or an error event). The per-chunk path: keep it lean (wire.py)."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .answer import END, Answer, Thought
from .openai_api import KEEPALIVE, Shapes
from .outcome import CHAT_PATH, failure, log_run
from .wire import body_send

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # nginx and friends: pass each chunk on, do not buffer
CLIENT_GONE = 499  # nginx's code for "the client closed the request"; only ever in our logs


class EventStream(Response):
    """The SSE body: the role chunk, then the deltas. Those that queued up before the model's stream
    began go out in one write; from then on the run's task writes each delta itself as it arrives
    (Answer.deliver), while this one sends keep-alive comments in silences. Then the finish chunk,
    usage when asked, and [DONE]. A failure after the first byte is an `error` event (the SDKs raise it)."""

    def __init__(self, answer: Answer, shapes: Shapes, first: str | None | object, gone: asyncio.Task[None],
                 include_usage: bool, keepalive: float, started: float, path: str = CHAT_PATH) -> None:
        super().__init__()
        self.answer, self.shapes, self.first, self.gone = answer, shapes, first, gone
        self.include_usage, self.keepalive, self.started, self.path = include_usage, keepalive, started, path
        self.last_write = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.body_send = body_send(scope, send)  # the chunks' send, under the middleware (wire.py)
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
            log_run(self.answer, status, True, self.started, self.path)

    async def _write(self, send: Any, data: bytes) -> None:
        self.last_write = time.monotonic()
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _deliver(self, send: Any, text: str) -> None:
        """Called by the run's task. A client that left mid-write: the disconnect watch ends the run."""
        with suppress(OSError):
            await self._write(send, self.shapes.content_chunk(text))

    async def _deliver_reasoning(self, send: Any, text: str) -> None:
        """Called by the run's task: a reasoning model's thinking, as delta.reasoning_content."""
        chunk = getattr(self.shapes, "reasoning_chunk", None)  # a protocol without the field: not sent
        if chunk is not None:
            with suppress(OSError):
                await self._write(send, chunk(text))

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
        send = self.body_send
        data, item = shapes.role_chunk(), self.first
        while True:
            while True:  # what has queued up goes out in one write
                if isinstance(item, str):
                    data += shapes.content_chunk(item)
                elif type(item) is Thought and hasattr(shapes, "reasoning_chunk"):
                    data += shapes.reasoning_chunk(item.text)  # type: ignore[attr-defined]
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
                answer.deliver_reasoning = lambda text: self._deliver_reasoning(send, text)
                await self._keep_alive(send)
                break
            try:
                async with asyncio.timeout(self.keepalive):
                    item = await queue.get()
            except TimeoutError:
                item, data = WAITING, KEEPALIVE
        await answer.wait()
        failed = answer.failure
        if failed is None and not answer.parts and answer.text:  # a flow with no chat step: its outputs
            await send({"type": "http.response.body", "body": shapes.content_chunk(answer.text), "more_body": True})
        error = failure(failed)[1]["error"] if failed is not None else None
        tail = shapes.tail(answer, error, self.include_usage)  # the finish (or the error) in the protocol's shapes
        await send({"type": "http.response.body", "body": tail, "more_body": False})



WAITING = object()  # no delta yet: the response has started, the run has not spoken



async def first_item(answer: Answer, gone: asyncio.Task[None], wait: float) -> str | None | object:
    """STARTED (the model accepted the request), the first delta, END, or WAITING after `wait` seconds
    (the response then starts, so keep-alive comments can hold the connection open through a slow
    retrieval). Until then a failure (a bad input, the model's 429...) is still an HTTP error status;
    after, an error event. The head goes out while the model thinks, so the first token is one write."""
    get = asyncio.ensure_future(answer.queue.get())
    try:
        await asyncio.wait({get, gone}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    return get.result() if get.done() and not get.cancelled() else WAITING


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
