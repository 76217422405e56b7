"""Step types for tests only, loaded with FLOWRUNNER_PLUGINS=tests.support.plugin_steps.

They let the engine's timeouts, retries, partial outputs, Ctrl-C and secret redaction be tested
through the real CLI before (and independently of) the steps that do network I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from flowrunner.errors import StepFailed
from flowrunner.events import Event, TextDelta, Warning
from flowrunner.steps import register
from flowrunner.steps.base import Outputs, Step


@register
class TypeStep(Step):
    """Streams words with a delay between them; can fail after some, or hang."""

    type_name = "test_type"
    summary = "test only: streams `words` with `delay` seconds between them"
    properties = {
        "words": {"type": "array", "items": {"type": "string"}},
        "delay": {"type": "number"},
        "fail_after": {"type": "integer"},
        "retryable": {"type": "boolean"},
        "fail_times": {"type": "integer", "description": "fail the first N attempts"},
        "counter_file": {"type": "string"},
    }
    required = ("words",)
    outputs = {"text": "the words joined", "partial": "true when it failed midway"}
    result_default = "typed"

    async def run(self, ctx: Any) -> AsyncIterator[Event | Outputs]:
        p = ctx.props
        if p.get("counter_file"):  # count attempts across retries
            path = Path(p["counter_file"])
            n = int(path.read_text() or 0) + 1 if path.exists() else 1
            path.write_text(str(n))
        if ctx.attempt <= p.get("fail_times", 0):
            raise StepFailed(f"planned failure on attempt {ctx.attempt}", retryable=p.get("retryable", True))
        text = ""
        for i, word in enumerate(p["words"]):
            if p.get("fail_after") is not None and i == p["fail_after"]:
                raise StepFailed("the stream broke", outputs={"text": text, "partial": True},
                                 retryable=p.get("retryable", False))
            await asyncio.sleep(p.get("delay", 0))
            text += word
            yield TextDelta(ctx.step_id, word)
        yield Outputs({"text": text, "partial": False})


@register
class LeakStep(Step):
    """Behaves like a careless driver: puts the connection's secret into a log line, a warning
    and an error message. Every one must reach the user redacted."""

    type_name = "test_leak"
    summary = "test only: leaks its connection's api_key everywhere it can"
    properties = {}
    connection_types = ("openai",)
    required = ("connection",)

    async def run(self, ctx: Any) -> AsyncIterator[Event | Outputs]:
        key = ctx.resolved_connection().config["api_key"]
        structlog.get_logger("test").error("driver said", dsn=f"key={key}", detail=[key])
        yield Warning(ctx.step_id, f"warning mentioning {key}")
        raise StepFailed(f"401 unauthorized for key {key}", hint=f"check {key}")
