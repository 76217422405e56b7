"""flow/fastcheck.py may only say "valid" where jsonschema finds no error: checked against jsonschema
itself on the example flows and on thousands of broken copies of them."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import yaml

from flowrunner.flow.schema import _compiled

FLOWS = sorted((Path(__file__).resolve().parents[1] / "flows").glob("*.yaml"))
ODD_VALUES = [None, True, False, 0, 1, -1, 2.5, 1.0, 3_000_000, "", "x", "${inputs.q}", "bad name", "gpt-4o",
              [], [1], ["a"], {}, {"a": 1}, {"type": "openai"}]


def _jsonschema_errors(compiled: Any, data: Any) -> list[Any]:
    """Every error of both passes, asked of jsonschema directly (no quick path)."""
    from flowrunner.connections.registry import CONNECTION_TYPES
    from flowrunner.steps import STEP_TYPES

    errors = list(compiled.flow.iter_errors(data))
    if isinstance(data, dict):
        steps, connections = data.get("steps"), data.get("connections")
        for key, item in enumerate(steps) if isinstance(steps, list) else ():
            errors += compiled._item_errors("step", STEP_TYPES, item, ("steps", key))
        for key, item in connections.items() if isinstance(connections, dict) else ():
            errors += compiled._item_errors("connection", CONNECTION_TYPES, item, ("connections", key))
    return errors


def _places(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        out += _places(value, (*path, key))
    return out


def _break(data: Any, rng: random.Random) -> None:
    path = rng.choice(_places(data)[1:])
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    roll = rng.random()
    if roll < 0.6 or not isinstance(parent, dict):
        parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif roll < 0.8:
        del parent[path[-1]]
    else:
        parent[f"zz_{path[-1]}"] = copy.deepcopy(rng.choice(ODD_VALUES))


def test_the_example_flows_pass_the_quick_check() -> None:
    compiled = _compiled()
    for file in FLOWS:
        data = yaml.safe_load(file.read_text())
        assert compiled._surely_valid(compiled.flow, data), file.name
        assert not _jsonschema_errors(compiled, data), file.name


def test_the_quick_check_never_passes_what_jsonschema_rejects() -> None:
    compiled = _compiled()
    flows = [yaml.safe_load(file.read_text()) for file in FLOWS]
    rng = random.Random(14)
    passed = rejected = 0
    for _ in range(2000):
        data = copy.deepcopy(rng.choice(flows))
        for _ in range(rng.randint(1, 2)):
            _break(data, rng)
        errors = _jsonschema_errors(compiled, data)
        if compiled._surely_valid(compiled.flow, data):
            passed += 1
            assert not errors, (errors[0].message, data)
        rejected += bool(errors)
    assert passed and rejected  # both sides were exercised


def test_a_broken_flow_still_gets_jsonschemas_message(tmp_path: Path, cli: Any) -> None:
    flow = tmp_path / "bad.yaml"
    flow.write_text("version: 1\nname: bad\nsteps:\n  - id: a\n    type: set\n    values: {x: 1}\n    retry: 0\n")
    result = cli("validate", str(flow))
    assert result.returncode != 0
    assert f"{flow}:7:12: steps[0].retry: 0 is less than the minimum of 1" in result.stderr + result.stdout
