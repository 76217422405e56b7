"""Every file in tests/flows/invalid/ is one kind of mistake; `flowrunner validate` must report it
at the expected line:col with the expected message (tests/flows/invalid.expected.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli

INVALID = ROOT / "tests/flows/invalid"
EXPECTED: dict[str, list[str]] = yaml.safe_load((ROOT / "tests/flows/invalid.expected.yaml").read_text())
FILES = sorted(p.name for p in INVALID.glob("*.yaml"))


@pytest.fixture(scope="module")
def report() -> tuple[str, dict[str, list[dict]]]:
    text = run_cli("validate", "tests/flows/invalid")
    assert text.returncode == 1, text.stderr
    as_json = run_cli("validate", "--format", "json", "tests/flows/invalid")
    files = {Path(f["file"]).name: f["problems"] for f in json.loads(as_json.stdout)["files"]}
    return text.stdout, files


def test_every_file_has_expectations() -> None:
    assert len(FILES) >= 25
    assert sorted(EXPECTED) == FILES


@pytest.mark.parametrize("name", FILES)
def test_invalid_flow_reported_at_line_and_col(name: str, report: tuple[str, dict[str, list[dict]]]) -> None:
    text, files = report
    rel = f"tests/flows/invalid/{name}"
    blocks = [block for block in text.split("Error: ") if block.startswith(rel + ":")]
    section = "".join(blocks)
    assert blocks, f"no error printed for {name}"
    for expected in EXPECTED[name]:
        line, col, message = expected.split(":", 2) if expected[:1].isdigit() else ("", "", expected)
        if line:  # this problem, at exactly this place
            at = f"{rel}:{line}:{col}: "
            assert any(b.startswith(at) and message.strip() in b for b in blocks), section
        else:
            assert expected in section, section
    first = EXPECTED[name][0].split(":", 2)
    assert any(p["line"] == int(first[0]) and p["col"] == int(first[1]) for p in files[name]), files[name]


def test_no_traceback_and_github_format() -> None:
    out = run_cli("validate", "--format", "github", "tests/flows/invalid/unknown_step_type.yaml")
    assert out.returncode == 1
    assert out.stdout.startswith("::error file=tests/flows/invalid/unknown_step_type.yaml,line=5,col=11,")
    assert "'sett' is not a step type%0Ahint: did you mean 'set'?" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_example_flows_are_valid() -> None:
    out = run_cli("validate", "flows")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stderr
