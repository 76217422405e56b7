"""A small pool of worker threads for a blocking driver, lighter than run_in_executor: a job is one
queue put, and its result comes back with one call_soon_threadsafe (no concurrent.futures.Future,
no chained callbacks). That hop is most of what a short history query costs on top of the driver."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any


def _deliver(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():  # the caller went away (Ctrl-C); the job itself ran to its end
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class Workers:
    def __init__(self, size: int, name: str) -> None:
        self._size, self._name = size, name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop] | None] = (
            queue.SimpleQueue())
        self._threads: list[threading.Thread] = []

    async def run(self, job: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        if not self._threads:  # all started on first use: an idle thread costs nothing
            self._threads = [threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
                             for i in range(self._size)]
            for thread in self._threads:
                thread.start()
        fut = loop.create_future()
        self._jobs.put((job, fut, loop))
        return await fut

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, fut, loop = item
            if fut.cancelled():  # its caller is gone (Ctrl-C) before it started: don't start it
                continue
            try:
                result, error = job(), None
            except BaseException as e:  # handed to the awaiting task, raised there
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_deliver, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def shutdown(self, wait: float = 5.0) -> None:
        """Let the jobs in flight finish (a save completes), then stop every thread; but wait at most
        `wait` seconds in all: a query stuck on a lock or a dead server must not hold up an exit (the
        threads are daemons: they end with the process)."""
        import time

        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
