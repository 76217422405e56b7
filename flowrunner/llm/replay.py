"""Testing flows without a model: `run --dry-run`, `--record FILE`, `--replay FILE`.

A recording is a JSON Lines file, one line per chat call:

    {"step": "answer", "request": {"model": ..., "messages": [...], ...}, "chunks": ["{...}", ..., "[DONE]"]}
    {"step": "retrieve", "kind": "embedding", "request": {"model": ..., "input": [...]}, "vectors": [[...]]}

`chunks` are the `data:` payloads of the server's event stream exactly as they arrived, so a replay
goes through the same parser, with the same chunking, as the live stream did. Embedding calls are
recorded too, so a replayed RAG flow needs no model server at all. A replayed call must
send the same request as the recorded one (model, messages, temperature, tools...): when it does not,
the run fails and says where the two differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FlowDefinitionError, Location, StepFailed

REQUEST_KEYS = ("model", "messages", "temperature", "max_completion_tokens", "tools", "tool_choice")


def comparable(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in REQUEST_KEYS if request.get(k) is not None}


def masked(value: Any) -> Any:
    """A value as the recording holds it: secrets masked (a replay compares like with like)."""
    from ..secrets import redact

    return json.loads(redact(json.dumps(value, ensure_ascii=False)))


class DryRun:
    """`--dry-run`: no model call; each chat step prints the request it would send."""

    kind = "dry-run"
    calls_model = False


class Recorder:
    """Opened at the first call it records: a flow that fails before any leaves an old recording alone."""

    kind = "record"
    calls_model = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        if path.is_dir() or not path.parent.is_dir():
            raise FlowDefinitionError.at("--record: not a file in an existing folder", Location(str(path)))

    def save(self, step: str, request: dict[str, Any], chunks: list[str]) -> None:
        self._write({"step": step, "request": comparable(request), "chunks": chunks})

    def save_embedding(self, step: str, request: dict[str, Any], vectors: list[Any]) -> None:
        self._write({"step": step, "kind": "embedding", "request": request, "vectors": [list(map(float, v)) for v in vectors]})

    def _write(self, record: dict[str, Any]) -> None:
        from ..secrets import redact

        if self._file is None:
            try:
                self._file = self.path.open("w", encoding="utf-8")
            except OSError as e:
                raise StepFailed(f"--record: cannot write {self.path}: {e.strerror or e}") from None
        line = json.dumps(record, ensure_ascii=False)
        self._file.write(redact(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Replayer:
    kind = "replay"
    calls_model = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list[dict[str, Any]] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise FlowDefinitionError.at(f"--replay: cannot read the file: {e.strerror or e}", Location(str(path))) from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and isinstance(record.get("request"), dict) and isinstance(
                    record.get("vectors" if record.get("kind") == "embedding" else "chunks"), list)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise FlowDefinitionError.at("--replay: not a recording made with --record", Location(str(path), n, 1),
                                             hint="each line is {\"step\", \"request\", \"chunks\"}")
            self._records.append(record)
        self._used: set[int] = set()

    def take(self, step: str, request: dict[str, Any]) -> list[str]:
        """The chunks recorded for this chat request (each recording plays once, in file order)."""
        return [str(c) for c in self._take("chat", step, masked(comparable(request)))["chunks"]]

    def take_embedding(self, step: str, request: dict[str, Any]) -> list[list[float]]:
        return self._take("embedding", step, masked(request))["vectors"]

    def _take(self, kind: str, step: str, wanted: dict[str, Any]) -> dict[str, Any]:
        unused = [i for i, r in enumerate(self._records) if i not in self._used and r.get("kind", "chat") == kind]
        for i in unused:
            if self._records[i]["request"] == wanted:
                self._used.add(i)
                return self._records[i]
        what = "chat request" if kind == "chat" else "embedding request"
        if not unused:
            raise StepFailed(f"replay mismatch: {self.path} has no recording left for this {what}",
                             hint="the flow calls the model more often than when it was recorded: "
                                  "record again with --record FILE")
        same_step = [i for i in unused if self._records[i].get("step") == step] or unused
        where = difference(self._records[same_step[0]]["request"], wanted)
        raise StepFailed(f"replay mismatch: the {what} differs from the one recorded in {self.path}: {where}",
                         hint="the flow or its inputs changed since the recording: record again with --record FILE")


def difference(recorded: Any, now: Any, path: str = "request") -> str:
    """Where two JSON values first differ, as `path: recorded X, now Y`."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        for key in list(recorded) + [k for k in now if k not in recorded]:
            if key not in now:
                return f"{path}.{key}: recorded {_short(recorded[key])}, now absent"
            if key not in recorded:
                return f"{path}.{key}: not recorded, now {_short(now[key])}"
            if recorded[key] != now[key]:
                return difference(recorded[key], now[key], f"{path}.{key}")
    if isinstance(recorded, list) and isinstance(now, list):
        for i, (a, b) in enumerate(zip(recorded, now)):
            if a != b:
                return difference(a, b, f"{path}[{i}]")
        if len(recorded) != len(now):
            return f"{path}: recorded {len(recorded)} item(s), now {len(now)}"
    return f"{path}: recorded {_short(recorded)}, now {_short(now)}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
