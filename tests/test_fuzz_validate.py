"""`validate` under fuzzed flow files (issue 17): the example flows, mutated — a value swapped for a
list, a map, a huge integer, a NUL byte, deep nesting; a key swapped; the text cut short or given a
stray character. Whatever comes in, `validate` exits 0 or 1, never says "internal error", and puts
a file:line:col on every problem. Runs in-process (the real validate command, no child process), with
a bounded, derandomized number of examples so the suite stays fast and repeatable."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrunner.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEEDS = sorted((ROOT / "flows").rglob("*.yaml"))
PLACEHOLDER = "__fuzzed_value__"

# YAML text put where a value (or a key) was: what fuzzing found to break validate, and their kin.
SNIPPETS = [
    "[set]", "[openai, postgres]", "{set: 1}", "{}", "[]", "[[1]]", "[{a: 1}]", "null", "~", "true", "-1", "0",
    "9" * 4400, "-" + "9" * 5000, "9" * 400, "9" * 400 + ".5", "1.0e999", "-.inf", ".nan", "0x" + "f" * 5000,
    '"\\0"', '"a\\0b"', '"chat_history\\n"', '"\\t"', '"\\x85"', '"\\u2028"', "''", '"${"', '"${}"',
    '"${inputs.nope}"', '"${steps.nope.text}"', '"${env.HOME}"', '"${nope[0].x}"', '"$${x}"', '"${inputs.question}"',
    "[" * 120 + "]" * 120, "[" * 700 + "]" * 700, "{a: " * 300 + "1" + "}" * 300, "[" * 2000 + "]" * 2000,
    "&a [1, *a]", "!!python/object:os.system x", "!!binary aGk=", "2024-01-01", "yes", "0o17", "1:30",
]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*path, index))
    return out


def _swap(data: Any, path: tuple[Any, ...], *, key: bool) -> Any:
    """`data` with the value (or the key) at `path` replaced by the placeholder."""
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if key and isinstance(parent, dict):
        parent[PLACEHOLDER] = parent.pop(last)
    else:
        parent[last] = PLACEHOLDER
    return data


@st.composite
def mutated_flows(draw: st.DrawFn) -> str:
    seed = draw(st.sampled_from(SEEDS))
    text = seed.read_text(encoding="utf-8")
    kind = draw(st.sampled_from(["value", "value", "value", "key", "truncate", "insert"]))
    if kind in ("value", "key"):
        data = yaml.safe_load(text)
        path = draw(st.sampled_from(_paths(data)))
        swapped = _swap(data, path, key=kind == "key")
        dumped = yaml.safe_dump(swapped, sort_keys=False, allow_unicode=True, width=10**9)
        return dumped.replace(PLACEHOLDER, draw(st.sampled_from(SNIPPETS)), 1)
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    at = draw(st.integers(0, len(text)))
    stray = draw(st.sampled_from(["\0", "\t", "\x85", "\u2028", "\ufeff", "\x1b", "\r", "{", "[", "&", "*", "!",
                                  "%", "@", "`", "'", '"', "\\", "${", ": ", "\n  - ", "\n---\n", "\udcff"]))
    return text[:at] + stray + text[at:]


def _validate(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["validate", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(mutated_flows(), min_size=1, max_size=3))
def test_validate_survives_mutated_flows(texts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for i, text in enumerate(texts):
            file = Path(folder) / f"flow{i}.yaml"
            file.write_bytes(text.encode("utf-8", "surrogateescape"))
            files.append(str(file))

        code, out, err = _validate("--format", "json", *files)
        assert code in (0, 1), (code, out, err)
        assert "internal error" not in out + err, out + err
        report = json.loads(out)
        assert [f["file"] for f in report["files"]] == files  # every file reported, none lost
        assert code == (0 if report["valid"] else 1)
        for entry in report["files"]:
            for problem in entry["problems"]:
                assert problem["file"] and problem["line"] and problem["col"], problem

        code, out, err = _validate(*files)  # the text format: every line a user reads is located
        assert code in (0, 1) and "internal error" not in out + err
        for line in out.splitlines():
            if line.startswith("Error: "):
                assert re.match(r"Error: .+?:\d+:\d+: ", line), line
