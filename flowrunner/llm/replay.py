"""Testing flows without a model: `run --dry-run`, `--record FILE`, `--replay FILE`.

A recording is a JSON Lines file, one line per chat call:

    {"step": "answer", "request": {"model": ..., "messages": [...], ...}, "chunks": ["{...}", ..., "[DONE]"]}
    {"step": "retrieve", "kind": "embedding", "request": {"model": ..., "input": [...]}, "vectors": [[...]]}
    {"step": "recall", "kind": "history", "request": {"conversation_id": ...}, "messages": [...], "dropped": 0}

`chunks` are the `data:` payloads of the server's event stream exactly as they arrived, so a replay
goes through the same parser, with the same chunking, as the live stream did. Embedding calls are
recorded too, so a replayed RAG flow needs no model server at all. So is what each `history_load`
returned: a replay serves it back instead of reading the store, so a replay repeats the recorded run
whatever the history holds now (the `--record` run itself saved a turn, and a replay saves none).
A recording without history loads (made by an older flowrunner) leaves history_load reading the store.
A replayed call must send the same request as the recorded one (model, messages, temperature,
tools...): when it does not, the run fails and says where the two differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FlowDefinitionError, Location, StepFailed
from .options import NAMES as OPTION_NAMES

# What a chat request is recorded and matched by: a replay with another seed, stop, extra_body, schema
# or reasoning_effort is another request.
REQUEST_KEYS = ("model", "messages", "temperature", "max_completion_tokens", "tools", "tool_choice",
                *OPTION_NAMES, "response_format", "reasoning_effort")
PAYLOAD = {"embedding": "vectors", "history": "messages"}  # what each kind of record plays back (chat: chunks)


def _well_formed(record: Any) -> bool:
    """A line as --record writes it: a request, and the list that its kind (a text; none: chat) plays back."""
    if not isinstance(record, dict) or not isinstance(record.get("request"), dict):
        return False
    kind = record.get("kind", "chat")
    return isinstance(kind, str) and isinstance(record.get(PAYLOAD.get(kind, "chunks")), list)


def comparable(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in REQUEST_KEYS if request.get(k) is not None}


def masked(value: Any) -> Any:
    """A value as the recording holds it: secrets masked (a replay compares like with like)."""
    from ..secrets import redact

    return json.loads(redact(json.dumps(value, ensure_ascii=False)))


# What each mode does, by name (steps ask these, never `kind`, which is for messages). The run's
# llm_mode is None when live: the functions below answer for None too.
#   calls_model  a chat step calls the model (live, --record); history_save writes only then
#   replays      recorded results stand in for model calls, embedding calls and history loads
#   records      every model call, embedding call and history load is written to the recording


def calls_model(mode: Any) -> bool:
    return mode is None or mode.calls_model


def replays(mode: Any) -> bool:
    return mode is not None and mode.replays


def records(mode: Any) -> bool:
    return mode is not None and mode.records


class DryRun:
    """`--dry-run`: no model call; each chat step prints the request it would send."""

    kind = "dry-run"
    calls_model = False
    replays = False
    records = False


class Recorder:
    """Opened at the first call it records: a flow that fails before any leaves an old recording alone."""

    kind = "record"
    calls_model = True
    replays = False
    records = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._pending: list[dict[str, Any]] = []  # history loads before the first model call
        if path.is_dir() or not path.parent.is_dir():
            raise FlowDefinitionError.at("--record: not a file in an existing folder", Location(str(path)))

    def save(self, step: str, request: dict[str, Any], chunks: list[str]) -> None:
        self._write({"step": step, "request": comparable(request), "chunks": chunks})

    def save_embedding(self, step: str, request: dict[str, Any], vectors: list[Any]) -> None:
        self._write({"step": step, "kind": "embedding", "request": request, "vectors": [list(map(float, v)) for v in vectors]})

    def save_history(self, step: str, request: dict[str, Any], outputs: dict[str, Any]) -> None:
        record = {"step": step, "kind": "history", "request": request, "messages": outputs["messages"],
                  "dropped": outputs.get("dropped", 0), "tokens": outputs.get("tokens")}
        if self._file is None:  # kept until a model call is recorded: a run that reaches none leaves the file alone
            self._pending.append(record)
        else:
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        from ..secrets import redact

        from ..errors import FlowRuntimeError
        from ..sinks.guard import guarded

        if self._file is None:
            try:
                self._file = guarded(self.path.open("w", encoding="utf-8"), f"the recording {self.path}")
            except OSError as e:
                raise StepFailed(f"--record: cannot write {self.path}: {e.strerror or e}") from None
        pending, self._pending = self._pending, []
        try:  # a full disk fails the step (exit 1) naming the file; closing it later does not fail again
            for each in (*pending, record):
                self._file.write(redact(json.dumps(each, ensure_ascii=False)) + "\n")
            self._file.flush()
        except FlowRuntimeError as e:
            raise StepFailed(f"--record: {e.message}", hint=e.problems[0].hint) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Replayer:
    kind = "replay"
    calls_model = False
    replays = True
    records = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list[dict[str, Any]] = []
        from ..files import RECORDING_LIMIT, read_limited

        raw = read_limited(path, RECORDING_LIMIT, "--replay")  # /dev/zero or a FIFO: an error, not a hang
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise FlowDefinitionError.at("--replay: not a recording made with --record (not UTF-8 text)",
                                         Location(str(path), raw.count(b"\n", 0, e.start) + 1, 1)) from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                why = "" if _well_formed(record) else " (not a recorded call)"  # e.g. a `kind` that is a list
            except json.JSONDecodeError as e:
                why = f" (invalid JSON: {e.msg})"
            except RecursionError:  # a hand-made or hostile file: an error at its line, never "internal error"
                why = " (a value nested too deeply to read)"
            except ValueError:  # int(): more than 4300 digits
                why = " (a number too long to read)"
            if why:
                raise FlowDefinitionError.at(f"--replay: not a recording made with --record{why}",
                                             Location(str(path), n, 1),
                                             hint="each line is {\"step\", \"request\", \"chunks\"} (a chat call), "
                                                  "or has \"kind\": \"embedding\" or \"history\"; record again "
                                                  "with --record FILE")
            self._records.append(record)
        self._used: set[int] = set()

    def take(self, step: str, request: dict[str, Any]) -> list[str]:
        """The chunks recorded for this chat request (each recording plays once, in file order)."""
        return [str(c) for c in self._take("chat", step, masked(comparable(request)))["chunks"]]

    def take_embedding(self, step: str, request: dict[str, Any]) -> list[list[float]]:
        return self._take("embedding", step, masked(request))["vectors"]

    def take_history(self, step: str) -> dict[str, Any] | None:
        """What this history_load step returned when recorded (each plays once, in file order), or None
        when the recording holds no history loads at all (then the step reads the store). Matched by
        step id alone: the history is the recorded one whatever the conversation now holds."""
        loads = [i for i, r in enumerate(self._records) if r.get("kind") == "history"]
        if not loads:
            return None
        for i in loads:
            record = self._records[i]
            if i not in self._used and record.get("step") == step:
                self._used.add(i)
                messages = record["messages"]
                return {"messages": messages, "count": len(messages), "dropped": record.get("dropped", 0),
                        "tokens": record.get("tokens")}
        raise StepFailed(f"replay mismatch: {self.path} has no recorded history left for step '{step}'",
                         hint="the flow loads the history more often, or in other steps, than when it was "
                              "recorded: record again with --record FILE")

    def _take(self, kind: str, step: str, wanted: dict[str, Any]) -> dict[str, Any]:
        unused = [i for i, r in enumerate(self._records) if i not in self._used and r.get("kind", "chat") == kind]
        for i in unused:
            if self._records[i]["request"] == wanted:
                self._used.add(i)
                return self._records[i]
        what = f"{kind} request"
        if not unused:
            raise StepFailed(f"replay mismatch: {self.path} has no recording left for this {what}",
                             hint="the flow calls the model more often than when it was recorded: "
                                  "record again with --record FILE")
        same_step = [i for i in unused if self._records[i].get("step") == step] or unused
        recorded = self._records[same_step[0]]["request"]
        grown = history_change(recorded, wanted)
        if grown:
            more = f"{abs(grown)} {'more' if grown > 0 else 'fewer'} message{'s' if abs(grown) != 1 else ''}"
            served = any(r.get("kind") == "history" for r in self._records)
            counts = f"request.messages: recorded {len(recorded['messages'])}, now {len(wanted['messages'])}"
            raise StepFailed(
                f"replay mismatch: the {what} differs from the one recorded in {self.path}: the history has "
                f"{more} than when recorded ({counts})",
                hint="the history given to the step changed since the recording (its `history:`): record again "
                     "with --record FILE" if served else
                     "this recording holds no history loads, so the history was read from the store, which "
                     "changed since (the --record run saved its own turn): record again with --record FILE, "
                     "or replay on the history it was recorded with")
        where = difference(recorded, wanted)
        raise StepFailed(f"replay mismatch: the {what} differs from the one recorded in {self.path}: {where}",
                         hint="the flow or its inputs changed since the recording: record again with --record FILE")


def history_change(recorded: dict[str, Any], now: dict[str, Any]) -> int:
    """How many more (negative: fewer) messages a chat request carries than the recorded one, when that
    is the whole difference: messages added or dropped between the first and the last ones the two
    share (the history sits between the system prompt and the question). 0 otherwise."""
    old, new = recorded.get("messages"), now.get("messages")
    if not (isinstance(old, list) and isinstance(new, list)) or len(old) == len(new):
        return 0
    if {k: v for k, v in recorded.items() if k != "messages"} != {k: v for k, v in now.items() if k != "messages"}:
        return 0
    short, long = (old, new) if len(old) < len(new) else (new, old)
    head = 0
    while head < len(short) and short[head] == long[head]:
        head += 1
    tail = 0
    while tail < len(short) - head and short[-1 - tail] == long[-1 - tail]:
        tail += 1
    return len(new) - len(old) if head + tail == len(short) else 0


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
