"""Every event as one JSON line, flushed at once, to a file or to stdout (`jsonl:-`)."""

from __future__ import annotations

import json
import sys
from typing import Any

from .. import secrets
from ..events import Event


class JsonlSink:
    def __init__(self, path: str) -> None:
        self.uses_stdout = self.stdout_taken = path == "-"
        self.stream = sys.stdout if self.uses_stdout else open(path, "w", encoding="utf-8")  # noqa: SIM115
        self._finished = False

    def handle(self, event: Event) -> None:
        record = event.as_dict()
        if event.kind == "run_finished":
            self._finished = True
        elif event.kind != "text":  # the model's own words are left alone; everything else is masked
            record = secrets.redact_value(record)  # before encoding: JSON escapes would hide a secret
        self.stream.write(json.dumps(record, ensure_ascii=False, default=_default) + "\n")
        self.stream.flush()

    def close(self, interrupted: bool = False) -> None:
        if interrupted and not self._finished:
            self.stream.write(json.dumps({"event": "run_finished", "status": "interrupted"}) + "\n")
        self.stream.flush()
        if not self.uses_stdout:
            self.stream.close()


def _default(value: Any) -> Any:
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
