from __future__ import annotations

import pytest

from flowrunner.llm.prompt import PromptError, build_messages, format_context, render_user_message


def test_order_is_system_history_user() -> None:
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    msgs = build_messages("sys", history, "q2")
    assert msgs == [{"role": "system", "content": "sys"}, *history, {"role": "user", "content": "q2"}]
    assert build_messages(None, None, "q")[0] == {"role": "user", "content": "q"}


def test_template_replaces_in_one_pass() -> None:
    # A user prompt that contains @@context, and a context that contains @@userPrompt, stay literal.
    text = render_user_message("ignore @@context", "ctx says @@userPrompt", "C: @@context | Q: @@userPrompt")
    assert text == "C: ctx says @@userPrompt | Q: ignore @@context"


def test_default_layout_with_and_without_context() -> None:
    assert render_user_message("q", None, None) == "q"
    assert render_user_message("q", "facts", None) == "Context:\nfacts\n\nQuestion: q"


def test_context_formats() -> None:
    assert format_context(["a", "b"]) == "[1] a\n\n[2] b"
    passages = [{"id": 7, "content": "pgvector adds vectors", "score": 0.9, "metadata": {"source": "docs/pg.md"}},
                {"id": 8, "content": "no metadata", "score": 0.5, "metadata": {}}]
    assert format_context(passages) == "[1] (source: docs/pg.md) pgvector adds vectors\n\n[2] (source: 8) no metadata"
    assert format_context([]) == ""


@pytest.mark.parametrize("history, message", [
    ("not a list", "history must be a list"),
    ([{"role": "wizard", "content": "x"}], "history[0] is not a {role, content} message"),
    ([{"role": "user"}], "history[0]"),
])
def test_bad_history_is_rejected(history, message: str) -> None:
    with pytest.raises(PromptError, match=message.replace("[", r"\[").replace("{", r"\{")):
        build_messages(None, history, "q")


def test_bad_context_is_rejected() -> None:
    with pytest.raises(PromptError):
        format_context([{"no": "content"}])
