from __future__ import annotations

import pytest

from flowrunner import refs
from flowrunner.refs import Ref, RefSyntaxError, RefValueError, Scope, Template, parse, resolve

SCOPE = Scope(
    inputs={"q": "what is RAG?", "n": 3},
    variables={"passages": [{"content": "first", "score": 0.9}, {"content": "second"}], "flag": True, "none": None},
    steps={"answer": {"usage": {"total_tokens": 42}, "finish_reason": "stop"}},
)


def test_plain_text_stays_text() -> None:
    assert parse("no refs here") == "no refs here"
    assert parse("cost: $5") == "cost: $5"


def test_escape_writes_literal() -> None:
    assert parse("literal $${x} and $${inputs.q}") == "literal ${x} and ${inputs.q}"
    assert resolve(parse("$${inputs.q} is ${inputs.q}"), SCOPE) == "${inputs.q} is what is RAG?"


def test_whole_value_keeps_its_type() -> None:
    assert resolve(parse("${passages}"), SCOPE) == SCOPE.variables["passages"]
    assert resolve(parse("${inputs.n}"), SCOPE) == 3
    assert resolve(parse("${flag}"), SCOPE) is True
    assert resolve(parse("${steps.answer.usage.total_tokens}"), SCOPE) == 42


def test_interpolation_renders_text() -> None:
    text = resolve(parse("n=${inputs.n} flag=${flag} none=[${none}] first=${passages[0].content}"), SCOPE)
    assert text == "n=3 flag=true none=[] first=first"
    assert resolve(parse("all: ${passages[1]}"), SCOPE) == 'all: {"content": "second"}'


def test_paths_and_indexes_parse() -> None:
    t = parse("${passages[0].content}")
    assert isinstance(t, Template) and t.whole == Ref("${passages[0].content}", "passages", (0, "content"))
    assert parse("${steps.answer.finish_reason}").whole.kind == "steps"  # type: ignore[union-attr]


def test_resolve_walks_containers() -> None:
    value = refs.compile_value({"a": ["${inputs.q}", {"b": "x ${inputs.n}"}], "c": 1})
    assert resolve(value, SCOPE) == {"a": ["what is RAG?", {"b": "x 3"}], "c": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("${x + 1}", "unexpected '+ 1'"),
        ("${}", "must start with a name"),
        ("${inputs}", "needs a name after it"),
        ("${steps.answer}", "name the output too"),
        ("hello ${name", "unterminated reference"),
        ("${a.b()}", "unexpected"),
        ("${a[-1]}", "unexpected"),
    ],
)
def test_bad_syntax_is_an_error(text: str, message: str) -> None:
    with pytest.raises(RefSyntaxError) as info:
        parse(text)
    assert message in info.value.message


@pytest.mark.parametrize(
    "text, message",
    [
        ("${passages[5].content}", "passages has 2 item(s), no [5]"),
        ("${passages[0].missing}", "passages[0] has no 'missing'"),
        ("${flag.x}", "flag is a boolean, it has no 'x'"),
        ("${steps.answer.usage[0]}", "not a list"),
    ],
)
def test_lookup_failures_say_where(text: str, message: str) -> None:
    with pytest.raises(RefValueError) as info:
        resolve(parse(text), SCOPE)
    assert message in str(info.value)
