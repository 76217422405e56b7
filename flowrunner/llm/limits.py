"""Requests- and tokens-per-minute limits for the model calls of a batch.

Every HTTP request the openai connections send (chat, embeddings, and the SDK's own retries) passes
`before_request`, so a provider counting requests sees exactly what the limit allows. Requests are
spaced evenly (60/rpm seconds apart, no burst): a provider's limiter refills continuously, so an
initial burst is what draws 429s. Tokens are known only from the usage a reply reports, so they are
charged afterwards, and a new request waits while the last minute's tokens are at the limit.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass

from ..errors import FlowDefinitionError

WINDOW = 60.0
_PART = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(rpm|tpm)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    rpm: float | None = None
    tpm: float | None = None

    @classmethod
    def parse(cls, specs: tuple[str, ...]) -> Limits | None:
        """`--rate-limit 500rpm --rate-limit 200000tpm`, or both in one: `500rpm,200000tpm`."""
        values: dict[str, float] = {}
        for spec in specs:
            for part in spec.split(","):
                m = _PART.match(part)
                if not m or float(m.group(1)) <= 0:
                    raise FlowDefinitionError.at(f"--rate-limit {spec!r}: expected a positive number of rpm or tpm",
                                                 hint="for example --rate-limit 500rpm,200000tpm")
                values[m.group(2).lower()] = float(m.group(1))
        return cls(**values) if values else None  # type: ignore[arg-type]

    def __str__(self) -> str:
        return ", ".join(f"{v:g} {k}" for k, v in (("rpm", self.rpm), ("tpm", self.tpm)) if v)


class RateLimiter:
    def __init__(self, limits: Limits, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.limits = limits
        self._clock = clock
        self._interval = WINDOW / limits.rpm if limits.rpm else 0.0
        self._next = 0.0  # the earliest moment the next request may start
        self._tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._token_sum = 0
        self._lock = asyncio.Lock()  # requests leave in the order they arrived
        self.waited = 0.0  # seconds spent waiting, for the summary

    async def before_request(self) -> None:
        async with self._lock:
            start = self._clock()
            if self.limits.tpm:
                while self._used(self._clock()) >= self.limits.tpm:
                    await asyncio.sleep(max(self._tokens[0][0] + WINDOW - self._clock(), 0.01))
            if self._interval:
                now = self._clock()
                if now < self._next:
                    await asyncio.sleep(self._next - now)
                    now = self._clock()
                self._next = max(now, self._next) + self._interval
            self.waited += self._clock() - start

    def charge(self, tokens: int) -> None:
        if self.limits.tpm and tokens > 0:
            self._tokens.append((self._clock(), tokens))
            self._token_sum += tokens

    def _used(self, now: float) -> int:
        while self._tokens and self._tokens[0][0] <= now - WINDOW:
            self._token_sum -= self._tokens.popleft()[1]
        return self._token_sum


LIMITER: ContextVar[RateLimiter | None] = ContextVar("flowrunner_rate_limiter", default=None)


async def throttle(_request: object) -> None:
    """An httpx2 request hook of the openai connections: waits for the batch's limiter, if any."""
    limiter = LIMITER.get()
    if limiter is not None:
        await limiter.before_request()
