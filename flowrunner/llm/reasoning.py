"""The chat step's request for reasoning models (OpenAI's o-series and gpt-5, DeepSeek-R1, Qwen3...):
`reasoning_effort`, the `developer` role for the system prompt, and no temperature (`temperature:
null`), which those models refuse. Their thinking, streamed by OpenAI-compatible servers as
`delta.reasoning_content` or `delta.reasoning`, is read by llm/stream.py and leaves the step as
ReasoningDelta events and its `reasoning` output, never inside the answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REFERENCE = {"$ref": "#/$defs/reference"}  # steps.base's: plain data here, so llm imports nothing of steps

EFFORTS = ("minimal", "low", "medium", "high")
SYSTEM_ROLES = ("system", "developer")
DEFAULT_TEMPERATURE = 0.7

PROPERTIES: dict[str, dict[str, Any]] = {
    "reasoning_effort": {"anyOf": [{"enum": list(EFFORTS)}, REFERENCE],
                         "description": "how hard a reasoning model thinks: " + ", ".join(EFFORTS)},
    "system_role": {"anyOf": [{"enum": list(SYSTEM_ROLES)}, REFERENCE], "default": "system",
                    "description": "the role of the system prompt's message: developer for o-series and newer "
                                   "OpenAI models"},
}

# The step's own temperature property, which may be null: reasoning models reject any temperature.
TEMPERATURE = {"anyOf": [{"type": ["number", "null"], "minimum": 0, "maximum": 2}, REFERENCE],
               "default": DEFAULT_TEMPERATURE,
               "description": "0..2; null leaves it out of the request (reasoning models refuse one)"}


def add_reasoning(request: dict[str, Any], props: Mapping[str, Any], messages: list[dict[str, Any]]) -> None:
    """temperature (0.7 when not set; none when null), reasoning_effort and the system prompt's role,
    into `request`. A value from a reference was checked against the schema by the engine already."""
    temperature = props.get("temperature", DEFAULT_TEMPERATURE)
    if temperature is not None:
        request["temperature"] = temperature
    if props.get("reasoning_effort") is not None:
        request["reasoning_effort"] = props["reasoning_effort"]
    if props.get("system_role") == "developer" and props.get("system_prompt") and messages[0]["role"] == "system":
        messages[0]["role"] = "developer"  # only the system prompt's message: a history's own messages stay


def message_reasoning(message: Any) -> str | None:
    """The reasoning of a whole (stream: false) reply's message, which the openai SDK keeps among the
    fields it does not know."""
    extra = getattr(message, "model_extra", None) or {}
    for name in ("reasoning_content", "reasoning"):
        value = extra.get(name)
        if isinstance(value, str) and value:
            return value
    return None
