"""How a request ended, told twice: to the client (a failed run's status, OpenAI-shaped error body and
Retry-After) and to the operator (the one `request` log line of each request)."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import structlog

from .. import secrets
from ..errors import FlowDefinitionError, FlowError
from ..llm.errors import RETRY_AFTER_HEADERS
from .openai_api import error_body

log = structlog.get_logger("flowrunner.serve")

CHAT_PATH = "/v1/chat/completions"  # the usual path: its `request` lines leave it out
_HEADER_VALUE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,63}")  # a plain, short header value: nothing to smuggle


def failure(error: FlowError) -> tuple[int, dict[str, Any]]:
    """A failed run's HTTP status and error body."""
    status = getattr(error, "http_status", 500)
    if isinstance(error, FlowDefinitionError):
        status = 500  # the flow's own set-up (a missing env var...), not the client's request
    kind = {400: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
    message = secrets.redact("; ".join(p.message for p in error.problems))
    return status, error_body(message, kind, None, "rate_limit_exceeded" if status == 429 else None)


def retry_after(error: FlowError) -> dict[str, str] | None:
    """A 429's Retry-After (and retry-after-ms, which the openai SDKs prefer) as the model's server
    sent them; with only retry-after-ms, Retry-After is its seconds, rounded up."""
    given = getattr(error, "http_headers", None)
    if getattr(error, "http_status", None) != 429 or not given:
        return None
    out = {k: v for k, v in given.items() if k in RETRY_AFTER_HEADERS and _HEADER_VALUE.fullmatch(v)}
    if "retry-after" not in out and "retry-after-ms" in out:
        try:
            out["retry-after"] = str(max(0, math.ceil(float(out["retry-after-ms"]) / 1000)))
        except (ValueError, OverflowError):  # nan, inf: no Retry-After of ours either
            pass
    return out or None


def log_run(answer: Any, status: int, stream: bool, started: float, path: str = CHAT_PATH) -> None:
    """The one `request` line of a request that ran the flow (answer: answer.Answer; info: shown at
    the default level, see command.py)."""
    usage, first = answer.usage, answer.first_token_at
    log.info("request", status=status, **_path(path), stream=stream, duration=round(time.monotonic() - started, 3),
             ttft=None if first is None else round(first - started, 3), prompt_tokens=usage.get("prompt_tokens"),
             completion_tokens=usage.get("completion_tokens"), total_tokens=usage.get("total_tokens"),
             usage=answer.usage_source, run_id=answer.run.run_id)


def log_request(request: Any, status: int, error: str | None = None) -> None:
    """The `request` line of a request that ran no flow: a refused one, /v1/models."""
    started = getattr(request.state, "started", None)
    log.info("request", status=status, **_path(request.url.path),
             duration=None if started is None else round(time.monotonic() - started, 3),
             **({"error": error} if error else {}))


def _path(path: str) -> dict[str, str]:
    return {} if path == CHAT_PATH else {"path": path}
