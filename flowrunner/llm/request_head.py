"""The chat step's streaming request, built from a template made once per connection and URL.

httpx2's `build_request` merges the client's headers with the request's and normalizes every one of
them, then encodes the JSON body and rebuilds the headers again to add Host and Content-Length: about
a fifth of the CPU a `serve` request spends before its upstream request is on the wire, and the same
work every time. Here the first request of a connection and URL goes through `build_request`, its
headers are kept, and the next ones copy them and set only what changes: the retry count and the
body's length. The request is the same, header for header and byte for byte (the tests compare them).

`build_request` is still used whenever the client could add something of its own: cookies it kept
from a response, query parameters, or headers or timeouts changed since the template was made."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

RETRY_COUNT = "x-stainless-retry-count"  # as chat_request.py sends it (the template keeps its spelling)
LENGTH = "Content-Length"  # as httpx2 adds it for a JSON body


@dataclass
class _Template:
    url: Any  # the httpx2.URL it was made for (LLMClient.chat_url caches it: the same object each time)
    headers: Any  # httpx2.Headers of a request with an empty body
    client_headers: list[tuple[bytes, bytes]]  # the client's headers then: changed, the template is stale
    timeout: Any  # the client's httpx2.Timeout then
    extensions: dict[str, Any]  # {"timeout": ...} as build_request sets it


def build_chat_request(llm: Any, url: Any, body: dict[str, Any], retries: int) -> Any:
    """The httpx2.Request `http.build_request("POST", url, json=body, headers={**llm.headers,
    RETRY_COUNT: str(retries)})` would build, with less work after the first."""
    import httpx2

    http = llm.http
    if http.cookies or http.params:  # the client merges these itself: its own path
        return http.build_request("POST", url, json=body, headers={**llm.headers, RETRY_COUNT: str(retries)})
    cache: dict[int, _Template] = llm.requests
    key = id(url)  # unique while the template holds the URL
    template = cache.get(key)
    if template is None or template.url is not url or template.timeout != http.timeout \
            or template.client_headers != http.headers.raw:
        empty = http.build_request("POST", url, json={}, headers={**llm.headers, RETRY_COUNT: "0"})
        if len(cache) >= 64:  # models that come from inputs: keep the cache small (as LLMClient.urls)
            cache.clear()
        template = cache[key] = _Template(url, empty.headers, http.headers.raw, http.timeout, empty.extensions)
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    request = httpx2.Request("POST", url, headers=template.headers, stream=httpx2.ByteStream(content),
                             extensions={k: dict(v) if isinstance(v, dict) else v
                                         for k, v in template.extensions.items()})
    request.headers[RETRY_COUNT] = str(retries)  # in place: the merged headers hold each name once
    request.headers[LENGTH] = str(len(content))
    request.read()  # as build_request's Request does for a body in memory (request.content is set)
    return request
