"""Who may start a run now: `serve --max-concurrent-streams N` for the whole process, and, per API key
(`--api-key` given several times), `--max-streams-per-key N` and `--rate-limit-per-key Nrpm`, so one
client cannot starve the rest. These are LiteLLM's `max_parallel_requests` and `rpm_limit` of a
virtual key. A refusal is a 429 with Retry-After, in OpenAI's error shape; the SDKs retry it.

A stream counts from the moment its run starts until the run ends (a plain request too: it holds a
run as long). Per process: with --workers N each worker counts its own.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .openai_api import BadRequest

_RPM = re.compile(r"\s*(\d{1,9})\s*(?:rpm|/\s*min)\s*", re.IGNORECASE)
WINDOW = 60.0  # seconds: a rate per minute counts the requests of the last minute


class Refused(BadRequest):
    """A request refused before it runs, with the headers that say when to come back."""

    def __init__(self, message: str, status: int, type_: str, code: str, headers: Mapping[str, str]) -> None:
        super().__init__(message, None, status, type_, code)
        self.headers = dict(headers)


def parse_rpm(text: str) -> int:
    """`60rpm` or `60/min`: requests per minute. ValueError for anything else, or 0."""
    match = _RPM.fullmatch(text)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"{text!r} is not a rate: use requests per minute, e.g. 60rpm")
    return int(match.group(1))


@dataclass
class Admission:
    max_streams: int | None = None  # the whole process
    per_key_streams: int | None = None  # each API key
    per_key_rpm: int | None = None  # each API key: requests started in the last minute
    workers: int = 1  # serve --workers: each counts its own, and a refusal says so
    streams: int = 0
    _per_key: dict[int | None, int] = field(default_factory=dict)
    _recent: dict[int | None, deque[float]] = field(default_factory=dict)

    def admit(self, key: int | None) -> Callable[[Any], None]:
        """Counts a run in for `key` (the index of the client's API key; None: no keys) and returns
        what counts it out (call it once, with anything: it is a task's done callback); or Refused."""
        if self.max_streams is not None and self.streams >= self.max_streams:
            raise _busy(f"this server is answering as many streams as it allows at once ({self.max_streams}"
                        f"{self._each}): send the request again shortly")
        if self.per_key_streams is not None and self._per_key.get(key, 0) >= self.per_key_streams:
            raise _busy(f"this API key has {self.per_key_streams} streams open, as many as one key may"
                        f"{self._each}: send the request again when one has ended")
        if self.per_key_rpm is not None:
            now = time.monotonic()
            recent = self._recent.setdefault(key, deque())
            while recent and recent[0] <= now - WINDOW:
                recent.popleft()
            if len(recent) >= self.per_key_rpm:
                wait = max(1, math.ceil(recent[0] + WINDOW - now))
                raise Refused(f"this API key sent {self.per_key_rpm} requests in the last minute, as many as one "
                              f"key may{self._each}: send the request again in {wait} s", 429, "rate_limit_exceeded",
                              "rate_limit_exceeded", {"retry-after": str(wait)})
            recent.append(now)
        self.streams += 1
        self._per_key[key] = self._per_key.get(key, 0) + 1
        counted = True

        def release(_done: Any = None) -> None:
            nonlocal counted
            if counted:
                counted = False
                self.streams -= 1
                self._per_key[key] -= 1
        return release

    @property
    def _each(self) -> str:
        return f" in each of the server's {self.workers} worker processes" if self.workers > 1 else ""


def _busy(message: str) -> Refused:
    # When a stream ends cannot be known: a second is what a client that retries at once should wait.
    return Refused(message, 429, "rate_limit_exceeded", "too_many_streams", {"retry-after": "1"})
