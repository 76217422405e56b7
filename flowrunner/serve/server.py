"""uvicorn's server, which ends the runs in flight first when it shuts down (Ctrl-C, SIGTERM): their
streams close at once with an error event (503, "send it again"), instead of being cut, with a
traceback, after the grace period."""

from __future__ import annotations

from typing import Any

import uvicorn


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, served: Any) -> None:
        super().__init__(config)
        self.served = served  # app.Served: its `active` answers

    async def shutdown(self, sockets: Any = None) -> None:
        for answer in list(self.served.active):
            answer.stop()
        await super().shutdown(sockets)
