"""Graceful drain, on SIGTERM (what Kubernetes, systemd and docker stop send): serve stops accepting
connections (with --workers, the others take the new ones), answers a request that still comes on a
kept-alive connection with 503 + Retry-After, and /healthz with 503 {"status": "draining"}; the runs
in flight go on for up to `--grace` seconds. Those still running then are stopped: each stream ends
with an error event (503, "send the request again"), each plain request with a 503. Then it exits 0.

The default grace, 25 s, ends inside Kubernetes' default terminationGracePeriodSeconds (30 s), so the
streams cut at the end still get their error event before the SIGKILL. Ctrl-C (SIGINT) stops at once
(an operator at a terminal wants it gone); a second signal during a drain ends the drain at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

log = structlog.get_logger("flowrunner.serve")

DEFAULT_GRACE = 25.0
_POLL = 0.1  # seconds: how soon a run's end, or a second signal, is noticed (uvicorn polls as often)


async def drain(listeners: Iterable[Any], served: Any, grace: float, forced: Callable[[], bool]) -> None:
    """Stops accepting (`listeners`: the asyncio servers), then waits until no run of `served`
    (app.Served) is in flight, `grace` seconds have passed, or `forced()`."""
    served.draining = True
    for listener in listeners:
        listener.close()
    if served.active:
        log.info("draining", runs=len(served.active), grace=grace)
    deadline = time.monotonic() + grace
    while served.active and not forced():
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("grace period over: stopping the runs still in flight", runs=len(served.active))
            return
        tasks = {answer.task for answer in served.active if answer.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=min(left, _POLL))
        else:
            await asyncio.sleep(min(left, _POLL))
