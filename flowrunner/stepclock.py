"""A step's `timeout` clock, which opening a connection pauses.

A step's timeout counts the step's own work. Opening a connection the first time a step asks for it
(importing the openai SDK and building its client, starting the embedded PostgreSQL, a pool's first
logins) is the run's set-up, paid once: counted against a `timeout: 0.5` it failed a step that a fast
server answered in milliseconds. The engine runs each piece of a step's work inside `StepClock.timing()`;
`connections.pool.Connections.get` opens a connection inside `paused()`, which stops that clock and
moves its deadline on by the time the opening took.

Only the step's own timeout is paused: the bounded time that run_on_failure steps get after an
interruption (engine.py) keeps running while a connection opens, so a hung opening cannot hold a
stopped run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar

_CURRENT: ContextVar[StepClock | None] = ContextVar("flowrunner_step_clock", default=None)


class StepClock:
    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline  # the event loop's time at which the step times out; None: never
        self._timeout: asyncio.Timeout | None = None
        self._paused = 0  # pauses can overlap (two connections opened at once)
        self._since = 0.0

    @asynccontextmanager
    async def timing(self) -> AsyncIterator[None]:
        """Runs the body under the step's deadline, with this clock visible to `paused()`."""
        token = _CURRENT.set(self)
        try:
            async with asyncio.timeout_at(self.deadline) as timeout:
                self._timeout = timeout
                yield
        finally:
            self._timeout = None
            _CURRENT.reset(token)

    def _pause(self) -> None:
        if self._paused == 0:
            self._since = asyncio.get_running_loop().time()
            if self._timeout is not None and not self._timeout.expired():
                self._timeout.reschedule(None)
        self._paused += 1

    def _resume(self) -> None:
        self._paused -= 1
        if self._paused or self.deadline is None:
            return
        self.deadline += asyncio.get_running_loop().time() - self._since
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(self.deadline)


@contextmanager
def paused() -> Iterator[None]:
    """The current step's timeout does not count the body (a no-op outside a step, or without a timeout)."""
    clock = _CURRENT.get()
    if clock is None or clock.deadline is None:
        yield
        return
    clock._pause()
    try:
        yield
    finally:
        clock._resume()
