"""Every event as one JSON line, flushed at once, to a file or to stdout (`jsonl:-`)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .. import secrets
from ..events import Event
from .guard import guarded


class JsonlSink:
    def __init__(self, path: str) -> None:
        self.uses_stdout = self.stdout_taken = path == "-"
        stream = sys.stdout if self.uses_stdout else open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.stream = guarded(stream, "stdout" if self.uses_stdout else f"the events file {path}")
        self._finished = False
        self._run: dict[str, Any] = {}  # run_id, and when it started: for a run stopped before its run_finished

    def handle(self, event: Event) -> None:
        record = event.as_dict()
        if event.kind == "run_started":
            self._run = {"run_id": record["run_id"], "started": time.monotonic()}
        if event.kind == "run_finished":
            self._finished = True
        elif event.kind != "text" and event.kind != "reasoning":  # the model's own words are left alone;
            # everything else is masked
            record = secrets.redact_value(record)  # before encoding: JSON escapes would hide a secret
        self.stream.write(json.dumps(record, ensure_ascii=False, default=_default) + "\n")
        self.stream.flush()

    def close(self, interrupted: bool = False) -> None:
        if interrupted and not self._finished:  # stopped at once (a second Ctrl-C): the engine could not say it
            ended = {"event": "run_finished", "run_id": self._run.get("run_id"), "status": "interrupted", "outputs": {}}
            if self._run:
                ended["duration"] = time.monotonic() - self._run["started"]
            self.stream.write(json.dumps(ended) + "\n")
        self.stream.flush()
        if not self.uses_stdout:
            self.stream.close()


def _default(value: Any) -> Any:
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
