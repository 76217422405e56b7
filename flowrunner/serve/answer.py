"""One request's run of the flow, in its own task: its text deltas queued for the response (STARTED
first, once the model has accepted the request), or, once the response has taken over `deliver`,
written by the run's task itself the moment they arrive; its usage, finish_reason and failure kept
for the end."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress

from ..engine import Run
from ..errors import FlowError, FlowRuntimeError, Problem
from ..events import StepFinished, StreamStarted, TextDelta, Usage, add_usage

END = None  # queued when the run is over
STARTED = object()  # queued once, when the model accepted the request: the response can start


class Answer:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.parts: list[str] = []
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopped = False
        self.streaming = False  # the model has accepted the request
        self.deliver: Callable[[str], Awaitable[None]] | None = None  # set by a response that streams

    def start(self) -> Answer:
        self.task = asyncio.create_task(self._pump(), name=f"flowrunner run {self.run.run_id}")
        return self

    async def _pump(self) -> None:
        try:
            async with aclosing(self.run.events()) as events:
                async for event in events:
                    kind = type(event)
                    if kind is TextDelta:
                        self.parts.append(event.text)  # type: ignore[attr-defined]
                        if self.deliver is None:
                            self.queue.put_nowait(event.text)  # type: ignore[attr-defined]
                        else:  # no hop through the queue and another task: the delta goes out now
                            await self.deliver(event.text)  # type: ignore[attr-defined]
                    elif kind is StreamStarted and not self.streaming:
                        self.streaming = True
                        self.queue.put_nowait(STARTED)
                    elif kind is Usage:
                        add_usage(self.usage, event.usage)  # type: ignore[attr-defined]
                    elif kind is StepFinished and event.outputs.get("finish_reason"):  # type: ignore[attr-defined]
                        self.finish_reason = str(event.outputs["finish_reason"])  # type: ignore[attr-defined]
        finally:
            self.queue.put_nowait(END)

    async def wait(self) -> None:
        if self.task is None:
            return
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if not (self.stopped and self.task.done()):  # we are being cancelled, not (only) the run
                raise

    def stop(self) -> None:
        """The server is shutting down: end the run; its client gets an error (503) instead of a cut."""
        if self.task is not None and not self.task.done():
            self.stopped = True
            self.task.cancel()

    async def cancel(self) -> None:
        """The client went away: stop the run (its model stream is closed on the way out)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task

    @property
    def failure(self) -> FlowError | None:
        if self.stopped and self.run.error is None:
            error = FlowRuntimeError(Problem("the server is shutting down; the answer was stopped",
                                             hint="send the request again"))
            error.http_status = 503
            return error
        return self.run.error

    @property
    def text(self) -> str:
        if self.parts:
            return "".join(self.parts)
        from ..conversation import outputs_as_answer

        return outputs_as_answer(self.run.outputs)
