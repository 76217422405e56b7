"""Whatever text or YAML reaches the loader, the only outcomes are a Flow or a FlowError."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrunner.errors import FlowError
from flowrunner.flow.build import load_flow_text
from flowrunner.flow.model import Flow

WORDS = ["version", "name", "steps", "id", "type", "set", "values", "inputs", "outputs", "connections",
         "default", "string", "integer", "retry", "timeout", "run_on_failure", "openai", "api_key", "result",
         "${inputs.q}", "${x}", "${steps.a.x}", "${env.K}", "$${x}", "${", "${a[0].b}", "a", "b", "x", "q", "1"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                    st.sampled_from(WORDS))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=8)), children, max_size=5)),
    max_leaves=30,
)


def flowish() -> st.SearchStrategy[dict]:
    """Documents shaped like flows, so the generator reaches the reference checks and the builder."""
    step = st.fixed_dictionaries(
        {"id": st.sampled_from(["a", "b", "c", "a b"]), "type": st.sampled_from(["set", "sett", 1])},
        optional={"values": st.dictionaries(st.sampled_from(["x", "y", "bad key"]), scalars, max_size=3),
                  "retry": st.one_of(st.integers(-1, 3), st.dictionaries(st.sampled_from(["attempts", "backoff"]), scalars)),
                  "timeout": scalars, "run_on_failure": scalars, "title": scalars},
    )
    return st.fixed_dictionaries(
        {"version": st.sampled_from([1, 2, "1"]), "name": scalars, "steps": st.lists(step, max_size=4)},
        optional={"inputs": st.dictionaries(st.sampled_from(["q", "n"]), st.dictionaries(
                      st.sampled_from(["type", "default", "description"]), scalars, max_size=3), max_size=2),
                  "outputs": st.dictionaries(st.sampled_from(["o", "p"]), scalars, max_size=2),
                  "connections": st.dictionaries(st.sampled_from(["llm", "db"]), st.dictionaries(
                      st.sampled_from(["type", "api_key", "dsn"]), scalars, max_size=3), max_size=2)},
    )


def assert_flow_or_flow_error(text: str) -> None:
    try:
        assert isinstance(load_flow_text(text, "fuzz.yaml"), Flow)
    except FlowError as e:
        assert e.problems and all(p.message for p in e.problems)
        assert all(p.location is None or p.location.file == "fuzz.yaml" for p in e.problems)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    assert_flow_or_flow_error(text)


@SETTINGS
@given(documents)
def test_arbitrary_yaml_documents(doc: object) -> None:
    assert_flow_or_flow_error(yaml.safe_dump(doc, allow_unicode=True))


@SETTINGS
@given(flowish())
def test_flow_shaped_documents(doc: dict) -> None:
    assert_flow_or_flow_error(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))


@SETTINGS
@given(st.lists(st.sampled_from(["version: 1\n", "name: x\n", "steps:\n", "  - id: a\n", "    type: set\n",
                                 "    values: {a: ${x}}\n", "&a ", "*a", "[", "]", "{", "}", ": ", "- ", "\t", "'",
                                 '"', "!!python/object ", "<<: *a\n", "---\n", "\n", "  ", "${", "#"]), max_size=25))
def test_yaml_fragments(parts: list[str]) -> None:
    assert_flow_or_flow_error("".join(parts))
