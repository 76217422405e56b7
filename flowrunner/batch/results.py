"""The results file of a batch: one JSON line per finished item, appended the moment it finishes.

Each line is written with one `write` on a file opened O_APPEND, so a process killed at any moment
leaves whole lines, and at worst a torn last one. `--resume` keeps the items that ended ok, drops a
torn line and the failed items' lines (they run again), and appends the rest: every item ends in the
file exactly once.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import FlowDefinitionError, Location


def fingerprint(inputs: Any) -> str:
    return json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str)


class Results:
    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.resume = resume
        self.done: dict[int, str] = {}  # index -> fingerprint of the inputs it ran with (ok items)
        self.dropped = 0  # failed or torn lines removed by --resume, to run again
        self._fd: int | None = None

    def open(self) -> None:
        if self.path is None:
            self._fd = sys.stdout.fileno()
            return
        try:
            if self.resume and self.path.exists():
                self._load(self.path)
            elif not self.resume and self.path.exists() and self.path.stat().st_size:
                raise FlowDefinitionError.at(
                    f"{self.path} already holds results", hint="--resume runs only what is not in it yet; "
                    "or give another --output")
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if self.resume else os.O_TRUNC)
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise FlowDefinitionError.at(f"cannot write the results file {self.path}: {e.strerror or e}") from None

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        if self._fd is None:
            raise RuntimeError("Results.write before open")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd is not None and self.path is not None:
            os.close(self._fd)
        self._fd = None

    def _load(self, path: Path) -> None:
        raw = path.read_bytes()
        keep: list[bytes] = []
        lines = raw.split(b"\n")
        torn = lines.pop()  # after the last newline: empty, or a line cut short by a kill
        self.dropped += bool(torn.strip())
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                index, status = record["index"], record["status"]
            except (ValueError, TypeError, KeyError):
                raise FlowDefinitionError.at("not a line of flowrunner batch results", Location(str(path), number, 1),
                                             hint="--resume continues a results file written by flowrunner batch; "
                                                  "give another --output") from None
            if status == "ok" and index not in self.done:
                self.done[index] = fingerprint(record.get("inputs"))
                keep.append(line)
            else:
                self.dropped += 1
        if self.dropped:  # rewrite without them, atomically: a kill now loses nothing
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(line + b"\n" for line in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
