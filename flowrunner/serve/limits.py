"""What a request body of `serve` may be: JSON (Content-Type: application/json), and at most
--max-body-size, checked against Content-Length before reading, and while reading, so a chunked body
that never ends is cut off too.

The default (files.DEFAULT_MAX_BODY), 4 MiB, holds about eight times the text of a full 128k-token
context (some 512 KB), while a few hundred concurrent requests still cannot exhaust the memory.
"""

from __future__ import annotations

import re
from typing import Any

from ..files import GIB, KIB, MIB, format_size
from .openai_api import BadRequest

_SIZE = re.compile(r"\s*(\d{1,15})\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KIB, "kib": KIB, "kb": 1000, "m": MIB, "mib": MIB, "mb": 1000**2,
          "g": GIB, "gib": GIB, "gb": 1000**3}


def parse_size(text: str) -> int:
    """`4MiB`, `512 KiB`, `1MB` (10^6), `65536`: bytes. ValueError for anything else, or below 1 KiB."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size: use bytes or a unit, e.g. 4MiB, 512KiB, 1MB")
    size = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if size < KIB:
        raise ValueError(f"{text!r} is too small: a chat request needs at least 1 KiB")
    return size


def _too_large(limit: int) -> BadRequest:
    return BadRequest(f"the request body is larger than this server's limit of {format_size(limit)}", None, 413,
                      code="request_too_large")


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a starlette Request, or BadRequest: 413 once it is over `limit` bytes, 415 when it
    is not declared JSON. A web page can send any other page's visitors' browsers to POST text/plain
    (or a typeless Blob) across origins without a CORS preflight, and without --api-key that would
    start a run: only application/json needs the preflight that --cors-origin answers."""
    given = request.headers.get("content-type", "")
    if given.partition(";")[0].strip().lower() != "application/json":
        shown = repr(given[:60]) if given else "none"
        raise BadRequest(f"the request body must be JSON, sent with Content-Type: application/json (got {shown})",
                         None, 415, code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 15 or int(declared) > limit):
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
