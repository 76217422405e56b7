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
        self.unnumbered: list[int] = []  # lines (1-based) whose index is not an item number: dropped too
        self._fd: int | None = None

    def open(self) -> None:
        if self.path is None:
            self._fd = sys.stdout.fileno()
            return
        try:
            if self.resume and self.path.is_file():  # not a device or a pipe: nothing to resume from
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
        try:
            text = json.dumps(record, ensure_ascii=False, default=str)
        except (ValueError, RecursionError) as e:  # e.g. an int of more than 4300 digits: the line, not the batch
            text = json.dumps({**record, "inputs": None, "outputs": None,
                               "error": f"{record.get('error') or ''}\n(its inputs and outputs cannot be written as "
                                        f"JSON: {str(e)[:100]})".lstrip()}, ensure_ascii=False, default=str)
        data = (text + "\n").encode()
        if self._fd is None:
            raise RuntimeError("Results.write before open")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:  # a full disk: exit 1 naming the file; stdout closed (`| head`): 141, quietly
            from ..files import stdout_failed, write_error

            raise (stdout_failed(e) if self.path is None else write_error(e, f"the results file {self.path}")) from None

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
            except (ValueError, TypeError, KeyError, RecursionError):
                raise FlowDefinitionError.at("not a line of flowrunner batch results", Location(str(path), number, 1),
                                             hint="--resume continues a results file written by flowrunner batch; "
                                                  "give another --output") from None
            if type(index) is not int or index < 0:  # edited by hand: which item it was is unknown
                self.unnumbered.append(number)
                self.dropped += 1
                continue
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
