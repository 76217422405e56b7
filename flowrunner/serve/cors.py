"""`serve --cors-origin ORIGIN`: lets the web pages of those origins call serve from the browser.

An ASGI layer around the app, present only when origins are given (off by default: no CORS header,
and a preflight gets the 405 of any other method). It answers preflight requests (OPTIONS with
Access-Control-Request-Method) itself and adds Access-Control-Allow-Origin, Vary and
Access-Control-Expose-Headers to the head of every response to an allowed origin, the SSE streams
included. A request without an Origin header (no browser) passes untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

ALLOW_METHODS = b"GET, POST, OPTIONS"
# Headers a page's code may read beyond the safelisted ones: when to retry (after a 429 or a 503),
# and the run's id, to quote in a bug report.
EXPOSE_HEADERS = b"retry-after, retry-after-ms, x-flowrunner-run-id"
DEFAULT_ALLOW_HEADERS = b"authorization, content-type, x-conversation-id"
MAX_AGE = b"600"  # seconds a browser may keep a preflight's answer (Chrome caps it at 7200)
_ORIGIN = re.compile(r"https?://[a-z0-9.\-\[\]:]+")
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~\-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~\-]+)*")


def check_origin(text: str) -> str:
    """An origin as browsers send it (`https://app.example.com`, `http://localhost:5173`), or `*`;
    ValueError for anything else."""
    origin = text.strip().lower()
    if origin == "*":
        return origin
    if origin.endswith("/") or origin.count("/") > 2:
        raise ValueError(f"{text!r} is not an origin: an origin has no path, e.g. https://app.example.com")
    if not _ORIGIN.fullmatch(origin):
        raise ValueError(f"{text!r} is not an origin: use scheme://host[:port], e.g. http://localhost:5173, or *")
    return origin


def with_cors(app: Any, origins: Iterable[str]) -> Any:
    origins = tuple(origins)
    return Cors(app, origins) if origins else app


class Cors:
    def __init__(self, app: Any, origins: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(o.encode() for o in origins if o != "*")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # a repeated header: its last value, as browsers send each once
        origin = headers.get(b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = self.any or origin.lower() in self.origins
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await self._preflight(origin, allowed, headers, send)
            return
        if not allowed:  # no CORS header: the browser keeps the answer from the page
            await self.app(scope, receive, send)
            return
        added = [(b"access-control-allow-origin", b"*" if self.any else origin), (b"vary", b"Origin"),
                 (b"access-control-expose-headers", EXPOSE_HEADERS)]

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, origin: bytes, allowed: bool, headers: dict[bytes, bytes], send: Any) -> None:
        if not allowed:
            body = json.dumps({"error": {"message": f"the origin {origin.decode('latin-1')!r} may not call this "
                                                    "server: serve --cors-origin lists those that may",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "origin_not_allowed"}}).encode()
            await _respond(send, 403, [(b"content-type", b"application/json"), (b"vary", b"Origin")], body)
            return
        # The headers the page asked for (the openai JS SDK sends its own x-stainless-* ones): the
        # origin is the check, so any well-formed list is allowed.
        asked = headers.get(b"access-control-request-headers", b"").strip()
        allow_headers = asked if asked and _HEADER_LIST.fullmatch(asked) else DEFAULT_ALLOW_HEADERS
        out = [(b"access-control-allow-origin", b"*" if self.any else origin), (b"vary", b"Origin"),
               (b"access-control-allow-methods", ALLOW_METHODS), (b"access-control-allow-headers", allow_headers),
               (b"access-control-max-age", MAX_AGE)]
        if headers.get(b"access-control-request-private-network") == b"true":  # Chrome: a page calling localhost
            out.append((b"access-control-allow-private-network", b"true"))
        await _respond(send, 204, out, b"")


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    length = [(b"content-length", str(len(body)).encode())] if status != 204 else []  # a 204 has none
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *length]})
    await send({"type": "http.response.body", "body": body})
