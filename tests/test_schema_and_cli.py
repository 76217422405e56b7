from __future__ import annotations

import json
import subprocess
import sys

from jsonschema import Draft202012Validator

from flowrunner.flow.schema import build_schema
from tests.conftest import ROOT, run_cli


def test_schema_file_is_generated_from_the_registry() -> None:
    out = run_cli("schema")
    assert out.returncode == 0
    assert (ROOT / "schemas/flow.schema.json").read_text() == out.stdout, (
        "schemas/flow.schema.json is stale: run `flowrunner schema > schemas/flow.schema.json`")
    Draft202012Validator.check_schema(json.loads(out.stdout))


def test_each_step_and_connection_type_has_a_closed_schema() -> None:
    defs = build_schema()["$defs"]
    for name, schema in defs.items():
        if name.startswith(("step.", "connection.")):
            assert schema["additionalProperties"] is False, name
    assert {"connection.openai", "connection.azure_openai", "connection.postgres", "connection.sqlserver",
            "connection.sqlite", "step.set"} <= set(defs)


def test_steps_command_lists_and_describes() -> None:
    listing = run_cli("steps")
    assert listing.returncode == 0
    assert {line.split()[0] for line in listing.stdout.splitlines() if line} >= {"set", "chat_completion"}
    one = run_cli("steps", "set")
    assert "values: object (required)" in one.stdout and "example:" in one.stdout
    typo = run_cli("steps", "sett")
    assert typo.returncode == 2 and "did you mean 'set'?" in typo.stderr


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("flowrunner, version ")
    helped = run_cli("--help")
    assert helped.returncode == 0 and "validate" in helped.stdout and "run" in helped.stdout


def test_help_and_validate_do_not_import_heavy_libraries() -> None:
    probe = ("import sys\nfrom flowrunner.cli import main\nsys.argv = ['flowrunner'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('openai', 'asyncpg', 'pyodbc', 'httpx2', 'structlog', 'asyncio', 'numpy') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr)\n")
    for args in (["--help"], ["validate", "flows"], ["validate", "tests/flows/invalid"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True)
        assert "HEAVY []" in out.stderr, (args, out.stderr[-500:])


def test_the_step_reference_pages_are_current(tmp_path) -> None:
    out = run_cli("steps", "--markdown", str(tmp_path))
    assert out.returncode == 0, out.stderr
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (ROOT / "reference/steps").iterdir())
    for name in written:
        assert (tmp_path / name).read_text() == (ROOT / "reference/steps" / name).read_text(), (
            f"reference/steps/{name} is stale: run `make schema`")
    page = (tmp_path / "history_save.md").read_text()
    assert "| `conversation_id` | string | yes |" in page and "## Example" in page and "`message_ids`" in page
