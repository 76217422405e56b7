"""One request's run of the flow, in its own task: its text deltas queued for the response (STARTED
first, once the model has accepted the request), or, once the response has taken over `deliver`,
written by the run's task itself the moment they arrive; its usage, finish_reason and failure kept
for the end. The usage of a chat call whose server reported none is counted locally (usage.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from typing import Any

from ..engine import Run
from ..errors import FlowError, FlowRuntimeError, Problem
from ..events import ReasoningDelta, StepFinished, StreamStarted, TextDelta, Usage, add_usage
from .usage import LOCAL, MIXED, MODEL, count_locally

END = None  # queued when the run is over
STARTED = object()  # queued once, when the model accepted the request: the response can start


class Thought:
    """A reasoning model's thinking in the queue (a str there is the answer's text): sent to the
    client as delta.reasoning_content."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Answer:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.parts: list[str] = []
        self.usage: dict[str, Any] = {}  # token counts, and their details (nested)
        self.finish_reason: str | None = None
        self.refusal: str | None = None  # the model refused: sent as delta.refusal / message.refusal
        self.first_token_at: float | None = None  # time.monotonic() of the first text delta
        self.usage_source: str | None = None  # usage.MODEL, LOCAL or MIXED; None: no chat call
        self._uncounted: list[tuple[list[dict[str, Any]], str]] = []  # chat calls sent without usage
        self.task: asyncio.Task[None] | None = None
        self.stopped = False
        self.streaming = False  # the model has accepted the request
        self.deliver: Callable[[str], Awaitable[None]] | None = None  # set by a response that streams
        self.reasoning: list[str] = []  # a reasoning model's thinking: message.reasoning_content
        self.deliver_reasoning: Callable[[str], Awaitable[None]] | None = None  # set with `deliver`

    def start(self) -> Answer:
        self.task = asyncio.create_task(self._pump(), name=f"flowrunner run {self.run.run_id}")
        return self

    async def _pump(self) -> None:
        try:
            async with aclosing(self.run.events()) as events:
                async for event in events:
                    kind = type(event)
                    if kind is TextDelta:
                        if self.first_token_at is None:
                            self.first_token_at = time.monotonic()
                        self.parts.append(event.text)  # type: ignore[attr-defined]
                        if self.deliver is None:
                            self.queue.put_nowait(event.text)  # type: ignore[attr-defined]
                        else:  # no hop through the queue and another task: the delta goes out now
                            await self.deliver(event.text)  # type: ignore[attr-defined]
                    elif kind is ReasoningDelta:
                        await self._thought(event.text)  # type: ignore[attr-defined]
                    elif kind is StreamStarted and not self.streaming:
                        self.streaming = True
                        self.queue.put_nowait(STARTED)
                    elif kind is Usage:
                        add_usage(self.usage, event.usage)  # type: ignore[attr-defined]
                    elif kind is StepFinished:
                        self._step_finished(event)  # type: ignore[arg-type]
            if self._uncounted:
                counted = await asyncio.to_thread(count_locally, self._uncounted)
                if counted is not None:
                    add_usage(self.usage, counted)
                    self.usage_source = MIXED if self.usage_source == MODEL else LOCAL
                self._uncounted.clear()
        finally:
            self.queue.put_nowait(END)

    async def _thought(self, text: str) -> None:
        self.reasoning.append(text)
        if self.deliver_reasoning is None:
            self.queue.put_nowait(Thought(text))
        else:
            await self.deliver_reasoning(text)

    def _step_finished(self, event: StepFinished) -> None:
        if event.items is not None:  # a for_each step's own end (its outputs are lists): its items counted
            return
        outputs = event.outputs
        if outputs.get("finish_reason"):
            self.finish_reason = str(outputs["finish_reason"])
            self.refusal = outputs.get("refusal") or self.refusal
        messages = self.run.chat_messages.get(event.step if event.item is None else f"{event.step}[{event.item}]")
        if messages is None or event.status == "skipped":
            return  # not a chat call
        if outputs.get("usage"):
            self.usage_source = MODEL
        elif event.status == "ok" or outputs.get("text"):  # answered, if only in part: the model worked
            self._uncounted.append((messages, str(outputs.get("text") or "") + str(outputs.get("refusal") or "")
                                    + str(outputs.get("reasoning") or "")))  # thinking is generated tokens too

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
        if self.stopped and self.run.error in (None, self.run.interruption):  # the stop was ours
            error = FlowRuntimeError(Problem("the server is shutting down; the answer was stopped",
                                             hint="send the request again"))
            error.http_status = 503
            return error
        return self.run.error

    @property
    def text(self) -> str:
        # A refusal is the answer, and so is an empty answer after thinking: never the flow's outputs
        # as JSON (which would hold the thinking in the content).
        if self.parts or self.refusal or self.reasoning:
            return "".join(self.parts)
        from ..conversation import outputs_as_answer

        return outputs_as_answer(self.run.outputs)
