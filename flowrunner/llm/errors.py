"""The openai SDK's typed errors, as messages a person can act on."""

from __future__ import annotations

from typing import Any

from .stream import StreamError


def _server_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))


def api_error(e: Any, llm: Any) -> StreamError:
    """An SDK error before the stream started (the SDK already retried what it could)."""
    import openai

    if isinstance(e, openai.APITimeoutError):
        return StreamError(f"no response from {llm.where} within {llm.idle_timeout:g} s",
                           "raise the connection's `timeout`, or check the server", retryable=True, status=504)
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return StreamError(f"cannot reach {llm.where}: {type(cause).__name__}: {cause}",
                           "check base_url / endpoint, and that the server is running", retryable=True)
    if isinstance(e, openai.APIStatusError):
        status, text = e.status_code, _server_message(e)
        retries = f" after {llm.max_retries} retries" if llm.max_retries else ""
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
    return StreamError(f"{type(e).__name__}: {_server_message(e)}")
