"""The chat step's streaming request, sent on the connection's own httpx2 client (the SDK's pool,
timeouts, redirects and the batch rate-limit hook), to the URL, with the headers and the retry policy
the openai SDK would use, but without the SDK's per-request machinery (an options model, a deep copy
of the body, header merging): about 0.4 ms less before the request is on the wire, which `serve`
would otherwise add to every time to first token. Everything else still goes through the SDK.

The retry policy is the SDK's (openai._base_client): connection errors, timeouts, 408, 409, 429 and
5xx are retried up to the connection's max_retries; `x-should-retry` is obeyed; the wait is the
server's retry-after-ms / retry-after (seconds or a date) when it is within 2 minutes (a longer one
is not retried), otherwise 0.5 s doubling up to 8 s, less up to 25 % jitter."""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import ssl
import time
from typing import Any

from .errors import connection_error, status_error, timeout_error
from .request_head import build_chat_request

MAX_RETRY_AFTER = 120.0
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0


async def open_chat_stream(llm: Any, body: dict[str, Any]) -> Any:
    """POST the chat completion `body`; the httpx2 response of a 2xx, its body not read yet.
    Raises StreamError (after the retries) for anything else."""
    import anyio
    import httpx2

    http, url = llm.http, llm.chat_url(body["model"])
    # Azure sends its key in `api-key`, which httpx2 would carry along a redirect to another host
    # (it drops only Authorization): Azure's API does not redirect, so neither do we.
    follow = llm.kind != "azure_openai"
    retries = 0
    while True:
        request = build_chat_request(llm, url, body, retries)
        try:
            response = await http.send(request, stream=True, follow_redirects=follow)
        except httpx2.TimeoutException:
            if retries >= llm.max_retries:
                raise timeout_error(llm) from None
        except (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream) as e:  # what the SDK retries too
            if retries >= llm.max_retries:
                raise connection_error(e, llm) from None
        else:
            if response.status_code < 300:
                return response
            if retries >= llm.max_retries or not _should_retry(response.headers, response.status_code):
                raise status_error(response.status_code, await _error_body(response), llm, retries,
                                   headers=response.headers)
            await response.aclose()
            await asyncio.sleep(_delay(response.headers, retries))
            retries += 1
            continue
        await asyncio.sleep(_delay(None, retries))
        retries += 1


async def _error_body(response: Any) -> Any:
    """A refused request's body: its JSON, its text, or None when it cannot be read."""
    try:
        await response.aread()
    except Exception:  # noqa: BLE001 - a body cut short: the status says enough
        return None
    finally:
        await response.aclose()
    try:
        return response.json()
    except ValueError:
        return response.text


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked to wait: retry-after-ms, then retry-after (seconds or an HTTP date)."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value)
        except ValueError:
            continue
        if math.isinf(delay) and value.strip().lower() not in ("inf", "+inf", "infinity", "+infinity"):
            return MAX_RETRY_AFTER + 1  # a number too large to hold: too long to wait
        return delay / divisor
    try:
        date = email.utils.parsedate_tz(headers.get("retry-after"))
        return None if date is None else float(email.utils.mktime_tz(date) - time.time())
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _should_retry(headers: Any, status: int) -> bool:
    after = _retry_after(headers)
    if after is not None and math.isfinite(after) and after > MAX_RETRY_AFTER:
        return False
    explicit = headers.get("x-should-retry")
    if explicit in ("true", "false"):
        return explicit == "true"
    return status in (408, 409, 429) or status >= 500


def _delay(headers: Any, retries: int) -> float:
    after = _retry_after(headers) if headers is not None else None
    if after is not None and math.isfinite(after) and 0 < after <= MAX_RETRY_AFTER:
        return after
    return min(INITIAL_RETRY_DELAY * 2.0 ** min(retries, 1000), MAX_RETRY_DELAY) * (1 - 0.25 * random.random())
