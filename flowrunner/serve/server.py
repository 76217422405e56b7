"""uvicorn's server, which ends the runs in flight first when it shuts down: their streams close with
an error event (503, "send it again"), instead of being cut, with a traceback, after uvicorn's own
grace period. On SIGTERM it drains first (drain.py): new requests are refused while the runs in
flight get up to --grace seconds to finish."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import uvicorn

from .drain import DEFAULT_GRACE, drain


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, served: Any, grace: float = DEFAULT_GRACE) -> None:
        super().__init__(config)
        self.served = served  # app.Served: its `active` answers
        self.grace = grace
        self.draining = False
        self.drain_forced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            # Not captured for uvicorn to raise again at the end: a drained server exits 0.
            self.draining = self.should_exit = True
            self.served.draining = True  # at once: a request from now on is refused
            return
        if self.draining:
            self.drain_forced = True  # a second signal: stop the runs now
            if sig == signal.SIGTERM:
                return  # not captured either: ended early, the drain still exits 0, as --workers' parent does
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        if self.draining:
            await drain(self.servers, self.served, self.grace, lambda: self.drain_forced)
        for answer in list(self.served.active):
            answer.stop()
        await super().shutdown(sockets)
