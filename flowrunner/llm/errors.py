"""Failures before a model's answer starts, as messages a person can act on: from the openai SDK's
typed errors (embeddings, non-streaming chat) or from the chat step's own request (llm/chat_request.py)."""

from __future__ import annotations

from typing import Any

from ..secrets import shorten
from .stream import StreamError


def _server_message(body: Any, status: int) -> str:
    """What the server said: the error's message; a short plain-text body; else just the code."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str) and inner:  # {"error": "model not found"} (Ollama and friends)
            return inner
    if isinstance(body, str) and body.strip() and not body.lstrip().startswith("<"):  # not an HTML error page
        line = body.strip().splitlines()[0]
        return shorten(line, 160)  # masked first: a secret cut in two would escape the mask
    return f"Error code: {status}"


def timeout_error(llm: Any) -> StreamError:
    return StreamError(f"no response from {llm.where} within {llm.idle_timeout:g} s",
                       "raise the connection's `timeout`, or check the server", retryable=True, status=504)


def connection_error(cause: BaseException, llm: Any) -> StreamError:
    return StreamError(f"cannot reach {llm.where}: {type(cause).__name__}: {cause}",
                       "check base_url / endpoint, and that the server is running", retryable=True)


RETRY_AFTER_HEADERS = ("retry-after", "retry-after-ms")  # what a rate-limited server says; serve passes them on


def status_error(status: int, body: Any, llm: Any, retried: int | None = None, *,
                 headers: Any = None) -> StreamError:
    """A non-2xx answer, after `retried` retries (None: the SDK's, max_retries): `body` is its parsed
    JSON, or its text; `headers` its headers, whose Retry-After the error keeps (for serve's client)."""
    error = _status_error(status, body, llm, retried)
    error.headers = retry_headers(headers) if headers is not None else None
    error.server_status = status  # llm/fallback.py decides by it
    return error


def _status_error(status: int, body: Any, llm: Any, retried: int | None) -> StreamError:
    text = _server_message(body, status)
    retried = llm.max_retries if retried is None else retried
    retries = f" after {retried} {'retry' if retried == 1 else 'retries'}" if retried else ""
    if status == 429:
        return StreamError(f"rate limited (429){retries}: {text}",
                           "lower the concurrency, or raise the connection's max_retries", retryable=True, status=429)
    if status in (401, 403):
        hint = ("no API key was set, so none was sent: set the connection's api_key (e.g. OPENAI_API_KEY)"
                if getattr(llm, "keyless", False) else "check the connection's API key")
        return StreamError(f"authentication failed ({status}): {text}", hint)
    if status == 404:
        what = "deployment" if llm.kind == "azure_openai" else "model"
        return StreamError(f"not found (404): {text}", f"check the {what} name"
                           + (" and api_version" if llm.kind == "azure_openai" else "") + " and the URL")
    if status >= 500:
        return StreamError(f"server error ({status}){retries}: {text}", retryable=True)
    return StreamError(f"the request was rejected ({status}): {text}", status=400)


def retry_headers(headers: Any) -> dict[str, str] | None:
    """The server's Retry-After and retry-after-ms, for `serve` to pass on to its own client."""
    found = {name: headers[name] for name in RETRY_AFTER_HEADERS if headers.get(name)}
    return found or None


def api_error(e: Any, llm: Any) -> StreamError:
    """An SDK error before the answer started (the SDK already retried what it could)."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return timeout_error(llm)
    if isinstance(e, openai.APIConnectionError):
        return connection_error(e.__cause__ or e, llm)
    if isinstance(e, openai.APIStatusError):
        return status_error(e.status_code, e.body, llm, headers=e.response.headers)
    return StreamError(f"{type(e).__name__}: {getattr(e, 'message', e)}")
