"""serve's per-chunk path, kept lean: each delta is one write of bytes built from fixed halves around
its text, encoded by the C encoder that json.dumps itself uses for a string (json.dumps adds about
2 µs of Python around it per call), and written with the server's own `send`, beneath the
middleware: Starlette's error handlers and the CORS layer wrap `send` only to watch for the
response's start, which still goes through them; its body chunks need not."""

from __future__ import annotations

from json.encoder import encode_basestring
from typing import Any

RAW_SEND = "flowrunner.send"  # the ASGI scope key of the server's own send


def json_text(text: str) -> bytes:
    """`text` as a JSON string, as json.dumps(text, ensure_ascii=False).encode() writes it."""
    return encode_basestring(text).encode()


def with_raw_send(app: Any) -> Any:
    """The ASGI app, with the server's `send` left in each scope for body_send()."""
    async def app_with_raw_send(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[RAW_SEND] = send
        await app(scope, receive, send)
    return app_with_raw_send


def body_send(scope: dict[str, Any], send: Any) -> Any:
    """The `send` for a response's body, once its start went out through `send`."""
    return scope.get(RAW_SEND, send)
