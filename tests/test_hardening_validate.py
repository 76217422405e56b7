"""Issue 17, items 11, 15 and 24: bad flow files are located errors, never a crash; reference checking
is linear; a connection named through a reference is checked when resolved; identifiers with a
trailing newline are refused; unset environment variables are all found before the first step."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from flowrunner.errors import FlowDefinitionError
from flowrunner.flow.build import load_flow_text

LOCATED = re.compile(r"^Error: (?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): ", re.MULTILINE)

HEAD = "version: 1\nname: t\n"
SET = "  - {id: s, type: set, values: {a: 1}}\n"
LLM = "connections:\n  llm: {type: openai, api_key: k, base_url: 'http://127.0.0.1:9/v1'}\n  docs: {type: postgres}\n"

# Each of these stopped `validate` with "internal error" (found by fuzzing), and with it the other files.
BROKEN = {
    "step_type_list.yaml": HEAD + "steps:\n  - {id: s, type: [set]}\n",
    "step_type_map.yaml": HEAD + "steps:\n  - {id: s, type: {set: 1}}\n",
    "connection_type_list.yaml": HEAD + "connections:\n  llm: {type: [openai]}\nsteps:\n" + SET,
    "connection_list.yaml": HEAD + LLM + "steps:\n  - {id: a, type: chat_completion, connection: [llm], model: m, "
                                         "user_prompt: hi}\n",
    "connection_map.yaml": HEAD + LLM + "steps:\n  - {id: a, type: chat_completion, connection: {llm: 1}, model: m, "
                                        "user_prompt: hi}\n",
    "embedding_connection.yaml": HEAD + LLM + "steps:\n  - {id: f, type: vector_search, connection: docs, table: d, "
                                              "query: hi, embedding: {connection: [llm], model: m}}\n",
    "values_nested_list.yaml": HEAD + "steps:\n  - {id: s, type: set, values: [[1]]}\n",
    "values_map_in_list.yaml": HEAD + "steps:\n  - {id: s, type: set, values: [{a: 1}]}\n",
    "values_scalar.yaml": HEAD + "steps:\n  - {id: s, type: set, values: 5}\n",
    "huge_integer.yaml": HEAD + "inputs:\n  n: {type: integer, default: " + "9" * 4400 + "}\nsteps:\n" + SET,
    "huge_number_default.yaml": HEAD + "inputs:\n  n: {type: number, default: " + "9" * 400 + "}\nsteps:\n" + SET,
    "deep_list.yaml": HEAD + "steps:\n  - {id: s, type: set, values: {a: " + "[" * 600 + "]" * 600 + "}}\n",
    "deep_map.yaml": HEAD + "steps:\n  - {id: s, type: set, values: {a: " + "{a: " * 900 + "1" + "}" * 900 + "}}\n",
}


def test_validate_reports_every_file_each_with_a_located_error(cli, tmp_path: Path) -> None:
    for name, text in BROKEN.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "zz_valid.yaml").write_text(HEAD + "steps:\n" + SET, encoding="utf-8")
    out = cli("validate", "--format", "json", str(tmp_path))
    assert out.returncode == 1, out.stderr
    assert "internal error" not in out.stdout + out.stderr
    files = {Path(f["file"]).name: f for f in json.loads(out.stdout)["files"]}
    assert set(files) == {*BROKEN, "zz_valid.yaml"}
    assert files["zz_valid.yaml"]["valid"]
    for name in BROKEN:
        problems = files[name]["problems"]
        assert problems, name
        assert all(p["line"] and p["col"] for p in problems), (name, problems)

    text = cli("validate", str(tmp_path))
    assert text.returncode == 1 and "internal error" not in text.stdout + text.stderr
    assert {Path(m["file"]).name for m in LOCATED.finditer(text.stdout)} == set(BROKEN)
    assert f"{len(BROKEN)} of {len(BROKEN) + 1} file(s) invalid" in text.stderr


def test_what_each_broken_file_says(cli, tmp_path: Path) -> None:
    def problems(name: str) -> str:
        path = tmp_path / name
        path.write_text(BROKEN[name], encoding="utf-8")
        return cli("validate", str(path)).stdout

    assert ":4:19: steps[0].type: [\"set\"] is not a step type" in problems("step_type_list.yaml")
    assert "steps[0].connection: expected a string, got a list" in problems("connection_list.yaml")
    assert "steps[0].embedding.connection: expected a string, got a list" in problems("embedding_connection.yaml")
    assert ":4:31: inputs.n.default: the integer has more than 4300 digits" in problems("huge_integer.yaml")
    assert "inputs.n.default: default does not fit: expected a finite number" in problems("huge_number_default.yaml")
    assert "the YAML is nested more than 100 levels deep" in problems("deep_list.yaml")


def test_huge_and_deep_command_line_values_are_input_errors(cli, write_flow) -> None:
    flow = write_flow(HEAD + "inputs:\n  n: {type: number}\n  i: {type: integer, default: 1}\n"
                      "  o: {type: object, default: {}}\nsteps:\n  - {id: s, type: set, values: {a: '${inputs.n}'}}\n")
    cases = {
        ("n=" + "9" * 400,): "input 'n': expected a finite number (this one is too large)",
        ("n=1", "i=" + "9" * 5000): "input 'i': the integer has more than 4300 digits",
        ("n=1", "o=" + '{"a":' * 2000 + "1" + "}" * 2000): "input 'o': the value is nested more than 100 levels deep",
        ("n=1", "o={\"a\": " + "9" * 5000 + "}"): "input 'o': expected JSON for an object (an integer has more than",
    }
    for pairs, said in cases.items():
        out = cli("run", str(flow), *[a for p in pairs for a in ("-i", p)])
        assert out.returncode == 2, out.stderr
        assert said in out.stderr and "internal error" not in out.stderr
        assert "9" * 100 not in out.stderr  # the value is not echoed whole


def test_huge_and_deep_values_in_an_inputs_file_are_located_errors(cli, write_flow, tmp_path: Path) -> None:
    flow = write_flow(HEAD + "inputs:\n  o: {type: object}\nsteps:\n  - {id: s, type: set, values: {a: '${inputs.o}'}}\n")
    cases = {
        "deep.json": ('{"o": ' + "[" * 3000 + "]" * 3000 + "}", "deep.json:1:1: invalid JSON: nested too deeply"),
        "big.json": ('{"o": {"n": ' + "9" * 5000 + "}}", "big.json:1:1: invalid JSON: an integer of more than 4300 digits"),
        "deep.yaml": ("o: " + "[" * 700 + "]" * 700, "deep.yaml:1:104: o[0][0][0][0][0][0][0]...: the YAML is nested more "
                                                       "than 100 levels deep"),
        "deepish.json": ('{"o": {"a": ' + "[" * 150 + "]" * 150 + "}}", "input 'o': the value is nested more than 100 "
                                                                         "levels deep"),
    }
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        out = cli("run", str(flow), "--inputs-file", str(tmp_path / name))
        assert out.returncode == 2, out.stderr
        assert said in out.stderr and "internal error" not in out.stderr


def _bad_reference_flow(steps: int, kind: str) -> str:
    out = [HEAD + "inputs:\n  q: {type: string, default: x}\nsteps:"]
    for i in range(steps):
        ref = {"good": "${inputs.q}" if i == 0 else f"${{v{i - 1}}}", "input": f"${{inputs.nope{i}}}",
               "variable": f"${{nope{i}}}", "step": f"${{steps.nope{i}.text}}"}[kind]
        out.append(f"  - id: s{i}\n    type: set\n    values:\n      v{i}: \"{ref}\"")
    return "\n".join(out) + "\n"


def _work(text: str) -> tuple[int, int]:
    """Function calls (Python and built-in) made while loading `text`, and the problems found: work
    counted, not timed, so the comparison holds on a loaded machine."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    problems = 0
    sys.setprofile(count)
    try:
        load_flow_text(text, "big.yaml")
    except FlowDefinitionError as e:
        problems = len(e.problems)
    finally:
        sys.setprofile(None)
    return calls, problems


def test_reference_checking_is_linear() -> None:
    small, large = 300, 1200
    good, problems = _work(_bad_reference_flow(large, "good"))
    assert problems == 0
    for kind in ("input", "variable", "step"):
        work_small, _ = _work(_bad_reference_flow(small, kind))
        work_large, found = _work(_bad_reference_flow(large, kind))
        assert found == large, kind
        # 4x the steps: about 4x the work (a quadratic check does 16x), and a bad flow about the work
        # of a good one of the same size (a generous bound: the error messages cost something).
        assert work_large < 6 * work_small, (kind, work_small, work_large)
        assert work_large < 5 * good, (kind, good, work_large)


def test_an_identifier_with_a_trailing_newline_is_refused_at_load(cli, write_flow) -> None:
    flow = write_flow(HEAD + 'steps:\n  - {id: h, type: history_load, conversation_id: c, table: "chat_history\\n"}\n'
                      '  - {id: "x\\n", type: set, values: {a: 1}}\n'
                      '  - {id: v, type: set, values: {a: 1}, title: "t"}\n')
    out = cli("validate", str(flow))
    assert out.returncode == 1
    assert ":4:60: steps[0].table: 'chat_history\\n' is not a valid table name" in out.stdout
    assert ":5:10: steps[1].id: 'x\\n' is not a valid name" in out.stdout


def test_a_table_name_from_a_reference_with_a_newline_is_refused_before_any_query(cli, write_flow, tmp_path) -> None:
    flow = write_flow(HEAD + "inputs:\n  t: {type: string}\nsteps:\n"
                      "  - {id: h, type: history_load, conversation_id: c, table: '${inputs.t}', create: true}\n")
    out = cli("run", str(flow), "-i", "t=chat_history\n", env={"FLOWRUNNER_DATA_DIR": str(tmp_path / "data")})
    assert out.returncode == 1, out.stderr
    assert "step 'h' (history_load) failed: table: 'chat_history\\n' is not a valid table name" in out.stderr


DYNAMIC = HEAD + """inputs:
  c: {type: string}
connections:
  llm: {type: openai, api_key: k, base_url: "http://127.0.0.1:9/v1"}
  store: {type: sqlite, path: history.db}
  unset: {type: sqlite, path: "${env.FR_TEST_UNSET_PATH}"}
steps:
  - {id: first, type: set, values: {a: 1}}
  - id: recall
    type: history_load
    connection: ${inputs.c}
    conversation_id: x
    create: true
outputs:
  n: ${steps.recall.count}
"""


def test_a_connection_named_by_a_reference_is_checked_when_resolved(cli, write_flow) -> None:
    flow = write_flow(DYNAMIC)
    assert cli("validate", str(flow)).returncode == 0
    out = cli("run", str(flow), "-i", "c=nope")
    assert out.returncode == 1, out.stderr
    assert (f"{flow}:11:5: step 'recall' (history_load) failed: connection ${{inputs.c}} is 'nope': unknown "
            "connection 'nope'\n  hint: declare it under connections: (declared: llm, store, unset)") in out.stderr
    out = cli("run", str(flow), "-i", "c=llm")
    assert out.returncode == 1, out.stderr
    assert ("connection ${inputs.c} is 'llm': connection 'llm' is openai, but a history_load step needs "
            "sqlserver or postgres or sqlite") in out.stderr
    assert "KeyError" not in out.stderr and "ensure_table" not in out.stderr
    out = cli("run", str(flow), "-i", "c=store", "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"n": 0}


def test_a_connection_that_needs_an_unset_variable_after_a_step_ran_is_a_step_failure(cli, write_flow) -> None:
    flow = write_flow(DYNAMIC)
    out = cli("run", str(flow), "-i", "c=unset")
    assert out.returncode == 1, out.stderr  # a step has run: never exit 2 now
    assert "connection 'unset' needs path: environment variable FR_TEST_UNSET_PATH is not set" in out.stderr


def test_an_embedding_connection_from_a_reference_is_accepted_at_load(cli, write_flow) -> None:
    flow = write_flow(HEAD + "inputs:\n  e: {type: string, default: llm}\n" + LLM +
                      "steps:\n  - {id: f, type: vector_search, connection: docs, table: d, query: hi, "
                      "embedding: {connection: '${inputs.e}', model: m}}\n")
    out = cli("validate", str(flow))
    assert out.returncode == 0, out.stdout


ENV_FLOW = HEAD + """connections:
  llm: {type: openai, api_key: "${env.FR_TEST_KEY}"}
  local: {type: openai, api_key: k, base_url: "http://${env.FR_TEST_HOST}/v1"}
  hist: {type: sqlite, path: "${env.FR_TEST_HISTORY}"}
  spare: {type: sqlserver, odbc: "${env.FR_TEST_ODBC}"}
steps:
  - {id: first, type: set, values: {a: 1}}
  - {id: recall, type: history_load, connection: hist, conversation_id: c}
  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: hi}
  - {id: other, type: chat_completion, connection: local, model: m, user_prompt: hi}
"""


def test_every_unset_variable_is_found_before_the_first_step(cli, write_flow) -> None:
    flow = write_flow(ENV_FLOW)
    out = cli("run", str(flow), "--sink", "jsonl:-")
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""  # not even run_started: nothing ran
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        f"Error: {flow}:4:33: connections.llm.api_key: connection 'llm' needs an API key: environment "
        "variable FR_TEST_KEY is not set",
        f"Error: {flow}:5:55: connections.local.base_url: environment variable FR_TEST_HOST is not set",
        f"Error: {flow}:6:31: connections.hist.path: connection 'hist' needs path: environment variable "
        "FR_TEST_HISTORY is not set",
    ]  # the unused sqlserver connection is not a problem


def test_a_dry_run_needs_no_model_key(cli, write_flow) -> None:
    flow = write_flow(HEAD + 'connections:\n  llm: {type: openai, api_key: "${env.FR_TEST_KEY}"}\n'
                      "steps:\n  - {id: answer, type: chat_completion, connection: llm, model: m, user_prompt: hi}\n")
    out = cli("run", str(flow), "--dry-run")
    assert out.returncode == 0, out.stderr
