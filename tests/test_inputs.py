from __future__ import annotations

import pytest

from flowrunner.errors import FlowDefinitionError
from flowrunner.flow.build import load_flow_text
from flowrunner.flow.inputs import resolve_inputs

FLOW = load_flow_text(
    """
version: 1
name: typed
inputs:
  s: {type: string}
  i: {type: integer, default: 5}
  f: {type: number, default: 0.5}
  b: {type: boolean, default: false}
  a: {type: array, default: []}
  o: {type: object, default: {}}
  mode: {type: string, default: fast, enum: [fast, slow]}
steps:
  - {id: x, type: set, values: {v: "${inputs.s}"}}
""",
    "typed.yaml",
)


def test_text_values_are_coerced_to_declared_types() -> None:
    given = {"s": "42", "i": "7", "f": "1e3", "b": "yes", "a": "[1, 2]", "o": '{"k": "v"}'}
    values = resolve_inputs(FLOW, given, from_text=frozenset(given))
    assert values == {"s": "42", "i": 7, "f": 1000.0, "b": True, "a": [1, 2], "o": {"k": "v"}, "mode": "fast"}


def test_defaults_fill_in() -> None:
    assert resolve_inputs(FLOW, {"s": "x"})["i"] == 5


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("i", "seven", "input 'i': expected an integer, got 'seven'"),
        ("i", "1_000", "input 'i': expected an integer, got '1_000'"),  # Python would take it
        ("f", "2_5.0", "input 'f': expected a number, got '2_5.0'"),
        ("f", "lots", "input 'f': expected a number"),
        ("b", "maybe", "input 'b': expected true or false"),
        ("a", "[1,", "input 'a': expected JSON for an array"),
        ("o", "[1]", "input 'o': expected an object"),
        ("mode", "medium", "'medium' is not one of: fast, slow"),
    ],
)
def test_values_that_do_not_fit_name_the_input(name: str, value: str, message: str) -> None:
    with pytest.raises(FlowDefinitionError) as info:
        resolve_inputs(FLOW, {"s": "x", name: value}, from_text=frozenset({name}))
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_missing_and_unknown_inputs_are_all_reported() -> None:
    with pytest.raises(FlowDefinitionError) as info:
        resolve_inputs(FLOW, {"z": "1"})
    text = str(info.value)
    assert "missing required input 's'" in text and "unknown input 'z'" in text


def test_typed_values_from_a_file_are_not_reparsed() -> None:
    with pytest.raises(FlowDefinitionError, match="expected an integer"):
        resolve_inputs(FLOW, {"s": "x", "i": "7"})  # from a JSON file, "7" is text, not a number
    assert resolve_inputs(FLOW, {"s": 'x', "i": 7})["i"] == 7
