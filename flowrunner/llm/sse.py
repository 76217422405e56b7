"""The `data` of each server-sent event of a streaming response, with less work per event than
httpx2's EventSource, which splits every network read into lines, decodes them one by one and builds
a frozen dataclass per event (about as much CPU as the json.loads of the chunk itself). A chat
stream's events are nearly all one `data: {...}` line: here each is one find and one slice. Any
other event (several data lines, comments, other fields) is read line by line by the same rules, and
CR or CRLF line ends are made LF first.

What comes out is what EventSource gives read_stream: a blank line ends an event; its `data` lines
are joined by newlines; an event without a data line is skipped (EventSource yields it with empty
data, which read_stream skips); an unfinished last event is dropped. An event longer than MAX_EVENT
characters, or a response that is not `text/event-stream` (the message says "content type", which
read_stream looks for), is an httpx2.SSEError, as EventSource raises it."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from typing import Any

MAX_EVENT = 1024 * 1024  # httpx2's own limit (DEFAULT_MAX_EVENT_SIZE_BYTES)


async def sse_data(response: Any) -> AsyncIterator[str]:
    """The data of each event of an httpx2 response, as it arrives."""
    import httpx2

    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
    if content_type.lower() != "text/event-stream":
        raise httpx2.SSEError(f"Expected response with content type 'text/event-stream', got {content_type!r}.")
    events = Events()
    # What aiter_text does, one async generator fewer per read: the body as it comes (or inflated when
    # the server compressed it), decoded incrementally in the response's encoding, errors replaced.
    chunks = response.aiter_bytes() if "content-encoding" in response.headers else response.aiter_raw()
    decode = codecs.getincrementaldecoder(response.encoding or "utf-8")(errors="replace").decode
    async for chunk in chunks:
        text = decode(chunk)
        if text:
            for data in events.feed(text):
                yield data
    text = decode(b"", True)  # an unfinished character at the end: U+FFFD, as aiter_text gives it
    if text:
        for data in events.feed(text):
            yield data
    for data in events.end():
        yield data


class Events:
    """Text in, as it arrives; the data of each event it completes out."""

    def __init__(self, limit: int = MAX_EVENT) -> None:
        self.buffer = ""  # the unfinished event
        self.cr = False  # the last text ended with CR: maybe the first half of a CRLF
        self.limit = limit

    def feed(self, text: str) -> list[str]:
        if self.cr:
            text, self.cr = "\r" + text, False
        if "\r" in text:
            if text[-1] == "\r":
                text, self.cr = text[:-1], True
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        buffer = self.buffer + text if self.buffer else text
        out: list[str] = []
        start = 0
        while (end := buffer.find("\n\n", start)) >= 0:
            if end - start > self.limit:
                self._too_long()
            block = buffer[start:end]
            start = end + 2
            if block.startswith("data: ") and "\n" not in block:  # the common case
                out.append(block[6:])
            elif block:
                data = _data_of(block)
                if data is not None:
                    out.append(data)
        self.buffer = buffer[start:] if start else buffer
        if len(self.buffer) > self.limit:
            self._too_long()
        return out

    def end(self) -> list[str]:
        """At the end of the body: a CR held back was a line end after all."""
        if not self.cr:
            return []
        self.cr = False
        return self.feed("\n")

    def _too_long(self) -> None:
        import httpx2

        raise httpx2.SSEError(f"Server-sent event exceeded the {self.limit} byte limit.")


def _data_of(block: str) -> str | None:
    """An event's data lines, joined; None when it has none (a comment, `event:` or `id:` alone)."""
    data: str | None = None
    for line in block.split("\n"):
        name, _, value = line.partition(":")  # a comment (`: keep-alive`) has the empty name
        if name == "data":
            if value[:1] == " ":
                value = value[1:]
            data = value if data is None else data + "\n" + value
    return data
