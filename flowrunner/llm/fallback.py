"""The chat step's `fallback:` models: tried in order when the model before them fails before its answer
began, so the answer comes from the first one that can give it, and reaches the sink once.

What falls back: a 429 after the connection's own retries, a 5xx, 408/409, a timeout, a connection
error, a 404 (no such model or deployment there), a 401/403 (a rotated or wrong key on one provider
says nothing about another: LiteLLM's router falls back on these too), and a 200 whose stream broke
before its first delta (an error event, a cut, a stall, a body that is not an event stream).
What does not: a request the server rejects (400, 413, 422...): the same messages would be rejected
by the next model too, and a 400 for the content policy must not be routed around; and anything after
the first delta (text, a refusal, a tool call, or any other event a call yielded): the user has seen
part of the answer, which would then print twice.

The step's `retry` wraps the whole list (every model again, from the first); a connection's
`max_retries` is the retry of one request to one model, before the next one is tried; the step's
`timeout` bounds the whole list, the connection's `timeout` one model's silence.

--record writes what each call produced, as without fallbacks: a model refused before its stream
(a 503) leaves no line, a stream that broke is recorded as it broke, and the answer that came is
recorded with the request that got it (the fallback's model). --replay tries the models in the same
order and plays the first one recorded, so a replay takes the same way as the recorded run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from ..errors import Problem, StepFailed

if TYPE_CHECKING:
    from ..events import Event
    from ..flow.model import StepSpec
    from ..steps.context import StepContext
    from .stream import StreamError, StreamState

LLM_TYPES = ("openai", "azure_openai")
FALLS_BACK = frozenset({401, 403, 404, 408, 409, 429})  # and every 5xx

FALLBACK_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "description": "models tried in order when the step's own fails before its answer starts (429 after "
                   "retries, 5xx, timeout, connection error, 404, 401/403); outputs model and connection "
                   "say which answered",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["connection"],
        "properties": {
            "connection": {"type": "string", "description": "an openai or azure_openai connection"},
            "model": {"type": "string", "description": "model id (openai connections)"},
            "deployment": {"type": "string", "description": "deployment name (azure_openai connections)"},
        },
    },
}


class Candidate:
    """A plain class: a dataclass costs every `validate` start-up time (bench/startup.py), for a run-time value."""

    __slots__ = ("connection", "model", "place")

    def __init__(self, connection: str, model: str, place: int) -> None:
        self.connection = connection
        self.model = model  # a model id (openai) or deployment name (azure_openai)
        self.place = place  # 0: the step's own model; n: the n-th entry of `fallback:`

    def __repr__(self) -> str:
        return f"Candidate({self.connection!r}, {self.model!r}, {self.place})"

    @property
    def label(self) -> str:
        return f"{self.connection}/{self.model}"

    @property
    def title(self) -> str:
        return "primary" if self.place == 0 else f"fallback {self.place}"


# --- at load time -------------------------------------------------------------------------------

def connections_of(spec: StepSpec) -> list[str]:
    """The connections the step's fallbacks name: opened by a live run, so checked before it."""
    entries = spec.props.get("fallback")
    if not isinstance(entries, (list, tuple)):
        return []
    return [e["connection"] for e in entries if isinstance(e, Mapping) and isinstance(e.get("connection"), str)]


def problems(spec: StepSpec, flow: Any) -> list[Problem]:
    """Each `fallback:` entry as the step's own model is checked: a declared openai or azure_openai
    connection, with `model` (openai) or `deployment` (azure_openai, or the connection's own)."""
    from ..connections.registry import connection_problem
    from ..flow.load import format_path

    entries = spec.props.get("fallback")
    if not isinstance(entries, (list, tuple)):
        return []
    source = getattr(flow, "source", None)
    declared = {n: c.type for n, c in flow.connections.items()}
    found: list[Problem] = []

    def problem(message: str, path: tuple[Any, ...], hint: str | None = None) -> None:
        where = source.location(path) if source is not None else spec.location
        found.append(Problem(message, where, format_path(path), hint))

    for i, entry in enumerate(entries):
        path = (*spec.path, "fallback", i)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("connection"), str):
            if isinstance(entry, Mapping) and entry.get("connection") is not None:
                problem("a fallback's connection is a connection's name, not a ${...} reference",
                        (*path, "connection"), "name one of the connections declared under connections:")
            continue  # the schema says what is wrong with it
        name = entry["connection"]
        wrong = connection_problem(name, LLM_TYPES, declared, "a chat_completion fallback")
        if wrong:
            problem(wrong[0], (*path, "connection"), wrong[1])
            continue
        if declared[name] == "openai":
            if "deployment" in entry:
                problem(f"`deployment` is for azure_openai connections; '{name}' is openai",
                        (*path, "deployment"), "an openai connection takes `model:`")
            elif "model" not in entry:
                problem(f"fallback to openai connection '{name}' needs `model:`", path,
                        "e.g. {connection: " + name + ", model: gpt-4o-mini}")
        else:
            if "model" in entry:
                problem(f"`model` is for openai connections; '{name}' is azure_openai", (*path, "model"),
                        "an azure_openai connection takes `deployment:` (or the connection's own deployment)")
            elif "deployment" not in entry and "deployment" not in flow.connections[name].config:
                problem(f"fallback to azure_openai connection '{name}' needs `deployment:`", path,
                        "set `deployment:` on the entry, or on the connection")
    return found


# --- at run time --------------------------------------------------------------------------------

def candidates(ctx: StepContext, model: Any) -> list[Candidate]:
    """The step's own connection and `model`, then each fallback's, in order."""
    out = [Candidate(ctx.props["connection"], model, 0)]
    for place, entry in enumerate(ctx.props.get("fallback") or (), 1):
        conn = ctx.resolved_connection(entry["connection"])
        chosen = entry.get("model") if conn.type == "openai" else (entry.get("deployment") or conn.config.get("deployment"))
        if not isinstance(chosen, str) or not chosen:  # a ${...} reference that resolved to something else
            raise StepFailed(f"fallback[{place - 1}]: the {'model' if conn.type == 'openai' else 'deployment'} "
                             f"is {chosen!r}, not a name", hint="a reference there must resolve to text")
        out.append(Candidate(entry["connection"], chosen, place))
    return out


def falls_back(error: StreamError) -> bool:
    status = error.server_status
    return status is None or status in FALLS_BACK or status >= 500


async def answer(step: Any, ctx: StepContext, request: dict[str, Any], state: StreamState,
                 mode: Any) -> AsyncIterator[Event]:
    """The chat step's call, to its own model and then to each fallback while they fail before their
    first delta. Raises StreamError: the last model's, or one that lists every model's."""
    from ..events import StreamStarted
    from .replay import replays
    from .stream import StreamError

    start = getattr(ctx.followup, "place", 0)  # a re-ask (structured.Reask) goes to the model that answered
    tried = [cand for cand in candidates(ctx, request["model"]) if cand.place >= start]
    failed: list[tuple[Candidate, str]] = []
    mismatch: StepFailed | None = None  # a replay: the first model's "not in the recording"
    transient = False  # some model failed in a way that may pass: the step's `retry` may try them all again
    for cand in tried:
        last = cand is tried[-1]
        _reset(state, cand.connection)
        state.place = cand.place
        body = {**request, "model": cand.model}
        delivered = False
        try:
            async with aclosing(step._call(ctx, cand.connection, body, state, mode)) as events:
                async for event in events:
                    if not delivered and type(event) is not StreamStarted:
                        delivered = True
                        if failed:  # before its first delta: the user learns at once who answers
                            for note in _announce(ctx.step_id, cand, failed):
                                yield note
                    yield event
        except StepFailed as e:
            if not replays(mode) or delivered:
                raise
            mismatch = mismatch or e  # a replay: this model's call is not in the recording
            failed.append((cand, "not in the recording (it did not answer when recorded)"))
            continue
        except StreamError as e:
            if delivered or state.tool_calls or not falls_back(e) or last:
                raise _final(e, cand, failed, delivered, transient) from None
            failed.append((cand, _line(e)))
            transient = transient or e.retryable
            continue
        if state.finish_reason or delivered or state.tool_calls:
            if failed and not delivered:  # a fallback answered with nothing to print (an empty answer)
                for note in _announce(ctx.step_id, cand, failed):
                    yield note
            return
        # the stream ended before the model finished and before any delta: nothing shown, try the next
        failed.append((cand, "the stream ended before the model finished (no finish_reason)"))
        transient = True
    if mismatch is not None and all(why.startswith("not in the recording") for _, why in failed):
        raise mismatch
    raise _final(StreamError("no model answered"), None, failed, False, transient)


def _reset(state: StreamState, connection: str) -> None:
    """A fresh start for the next model: the one before delivered nothing, but may have said its name,
    its usage, or [DONE]."""
    for f in fields(state):  # parts, refusal, tool_calls, and what other options keep (logprobs)
        kept = getattr(state, f.name)
        if isinstance(kept, (list, dict)):
            kept.clear()
    state.finish_reason = state.usage = state.model = None
    state.done = False
    state.connection = connection


def _line(error: StreamError) -> str:
    return error.message.replace("\n", " ")


def _announce(step_id: str, cand: Candidate, failed: list[tuple[Candidate, str]]) -> list[Event]:
    """The warning (stderr) and the event (jsonl, serve) that say which model answers, and why."""
    from ..events import Fallback, Warning
    from ..secrets import redact

    why = "; ".join(f"{c.title} {c.label} failed: {text}" for c, text in failed)
    return [Warning(step_id, redact(f"{why}; answered by {cand.title} ({cand.label})")),
            Fallback(step_id, cand.place, cand.connection, cand.model,
                     tuple({"connection": c.connection, "model": c.model, "error": redact(text)} for c, text in failed))]


def _final(error: StreamError, cand: Candidate | None, failed: list[tuple[Candidate, str]],
           delivered: bool, transient: bool) -> StreamError:
    """The step's error: `error` itself when it is the only one, or when the answer had begun (the
    models before are in the warning already); else one line per model tried, in order."""
    from .stream import StreamError

    if not failed or delivered:
        if not failed and not delivered and cand is not None and not falls_back(error):
            error.hint = (error.hint + "; " if error.hint else "") + (
                f"a request the server refuses ({error.server_status}) is not sent to the fallbacks")
        return error
    lines = [*failed, *([(cand, _line(error))] if cand is not None else [])]
    listing = "\n".join(f"  {c.title} {c.label}: {text}" for c, text in lines)
    combined = StreamError(f"no model answered ({len(lines)} tried):\n{listing}",
                           "each line is one model of the step and its `fallback:` list, in the order tried",
                           retryable=transient or error.retryable, status=error.status)
    combined.headers, combined.server_status = error.headers, error.server_status
    return combined
