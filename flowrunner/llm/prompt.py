"""Building the messages of a chat completion: system prompt, then history, then the user message.

The user message is the user prompt, or `prompt_template` with `@@context` and `@@userPrompt`
replaced in ONE pass: a user prompt that contains "@@context" (or a context that contains
"@@userPrompt") stays literal, so nobody can inject one placeholder through the other."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

PLACEHOLDERS = re.compile(r"@@(context|userPrompt)")
DEFAULT_TEMPLATE = "Context:\n@@context\n\nQuestion: @@userPrompt"
ROLES = ("system", "user", "assistant", "developer", "tool")


class PromptError(ValueError):
    pass


def format_context(context: Any) -> str:
    """Text as it is; a list of texts numbered; a vector_search result as numbered passages with
    their source."""
    if context is None:
        return ""
    if isinstance(context, str):
        return context
    if isinstance(context, Mapping):
        context = [context]
    if not isinstance(context, list):
        raise PromptError(f"context must be text, a list of texts or a vector_search result, not {type(context).__name__}")
    parts = []
    for i, item in enumerate(context, 1):
        if isinstance(item, str):
            parts.append(f"[{i}] {item}")
        elif isinstance(item, Mapping) and "content" in item:
            parts.append(f"[{i}] (source: {_source(item)}) {item['content']}")
        else:
            raise PromptError(f"context[{i - 1}] must be text or a passage with `content`")
    return "\n\n".join(parts)


def _source(passage: Mapping[str, Any]) -> str:
    meta = passage.get("metadata")
    if isinstance(meta, Mapping):
        for key in ("source", "path", "file", "url", "title"):
            if meta.get(key):
                return str(meta[key])
    return str(passage.get("id", "unknown"))


def render_user_message(user_prompt: str, context: Any, template: str | None) -> str:
    context_text = format_context(context)
    if template is None:
        if not context_text:
            return user_prompt
        template = DEFAULT_TEMPLATE
    values = {"context": context_text, "userPrompt": user_prompt}
    return PLACEHOLDERS.sub(lambda m: values[m.group(1)], template)


def build_messages(system_prompt: str | None, history: Any, user_prompt: str, context: Any = None,
                   template: str | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if history is not None and not isinstance(history, list):
        raise PromptError("history must be a list of {role, content} messages")
    for i, item in enumerate(history or []):
        if not isinstance(item, Mapping) or item.get("role") not in ROLES or not _content(item.get("content")):
            raise PromptError(f"history[{i}] is not a {{role, content}} message (role one of {', '.join(ROLES)}; "
                              "content text, or OpenAI content parts [{type: text, text}, {type: image_url, ...}])")
        messages.append({"role": item["role"], "content": item["content"]})
    messages.append({"role": "user", "content": render_user_message(user_prompt, context, template)})
    return messages


def _content(content: Any) -> bool:
    """Text, or a list of OpenAI content parts (each an object with a `type`), sent as it is."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in content)
