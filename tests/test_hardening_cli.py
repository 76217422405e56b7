"""Issue 17, the command line and logs: global options after the command (20), one error and whole
lines on a terminal or in one file (21), file options named in their errors (25), no import cycles
and plugin types in `schema` and `steps` (26), what `validate` imports (27)."""

from __future__ import annotations

import ast
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PLUGINS, ROOT, run_cli

STREAMING = """\
version: 1
name: typed
steps:
  - id: answer
    type: test_type
    words: ["hello ", "world"]
"""

BROKEN = """\
version: 1
name: broken
steps:
  - id: answer
    type: test_type
    words: ["hello ", "world"]
    fail_after: 1
"""

COMMANDS = [["run"], ["batch"], ["serve"], ["chat"], ["validate"], ["schema"], ["steps"],
            ["db", "init"], ["db", "status"], ["db", "stop"]]


def plugin_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWRUNNER_PLUGINS"}
    env.update(FLOWRUNNER_PLUGINS=PLUGINS, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


# --- 20: global options after the command ---------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_lists_the_global_options(command: list[str]) -> None:
    out = run_cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--debug", "--log-format", "-v, --verbose", "-q, --quiet"):
        assert option in out.stdout, (command, option)


def test_global_options_count_after_the_command(write_flow) -> None:
    flow = write_flow(STREAMING)
    for where in (["--debug", "run", str(flow)], ["run", str(flow), "--debug"]):
        out = run_cli(*where, plugins=True)
        assert out.returncode == 0 and out.stdout == "hello world\n", (where, out.stderr)

    quiet = run_cli("run", str(flow), "-q", plugins=True)  # errors only: none of the info lines
    assert quiet.returncode == 0 and quiet.stdout == "hello world\n" and quiet.stderr == ""
    chatty = run_cli("run", str(flow), "--log-format", "console", "-v", plugins=True)
    assert "run started" in chatty.stderr and not chatty.stderr.lstrip().startswith("{")

    # --debug after the command also reaches the error printer: the traceback of a user's error
    bad = run_cli("run", str(flow), "-i", "nosuch=1", "--debug", plugins=True)
    assert bad.returncode == 2 and "Traceback" in bad.stderr and "Error: " in bad.stderr
    assert "Traceback" not in run_cli("run", str(flow), "-i", "nosuch=1", plugins=True).stderr


def test_an_option_before_the_command_is_not_undone_after_it(write_flow) -> None:
    flow = write_flow(STREAMING)
    out = run_cli("-q", "run", str(flow), "--log-format", "json", plugins=True)
    assert out.returncode == 0 and out.stderr == ""


# --- 21: one error, whole lines ---------------------------------------------------------------------

def _run_on_a_terminal(*args: str) -> tuple[int, str]:
    """The CLI with stdout and stderr on one pseudo-terminal, as a user at a shell sees it."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", *args], cwd=ROOT, env=plugin_env(),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=30)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def test_on_a_terminal_an_error_is_printed_once(write_flow) -> None:
    flow = write_flow(BROKEN)
    rc, screen = _run_on_a_terminal("run", str(flow))
    assert rc == 1, screen
    assert screen.count("the stream broke") == 1, screen  # the Error: line, not a log line as well
    lines = screen.splitlines()
    assert lines[0] == "hello ", screen  # the partial answer ends its line before the error
    assert lines[-1].startswith("Error: ") and lines[-1].endswith("step 'answer' (test_type) failed: the stream broke")


def test_on_a_terminal_a_warning_does_not_continue_the_answer_line(write_flow) -> None:
    flow = write_flow(STREAMING)
    rc, screen = _run_on_a_terminal("run", str(flow), "-v")  # info lines on the console, right after the answer
    assert rc == 0, screen
    assert "step finished" in screen
    assert [line for line in screen.splitlines() if "hello" in line] == ["hello world"], screen


@pytest.mark.parametrize("flow_text, rc, answer", [(STREAMING, 0, "hello world"), (BROKEN, 1, "hello ")])
def test_stdout_and_stderr_in_one_file_keep_their_lines(write_flow, tmp_path: Path, flow_text: str, rc: int,
                                                       answer: str) -> None:
    flow = write_flow(flow_text)
    log = tmp_path / "run.log"
    with log.open("w") as both:  # `> run.log 2>&1`: JSON logs (not a terminal) at info level
        proc = subprocess.run([sys.executable, "-m", "flowrunner", "run", str(flow)], cwd=ROOT, env=plugin_env(),
                              stdout=both, stderr=both, timeout=60)
    assert proc.returncode == rc
    lines = log.read_text().splitlines()
    assert answer in lines, lines  # the answer alone on its line ...
    for line in lines:  # ... and every other line whole: a JSON log line or the error
        if line != answer:
            assert line.startswith(("{", "Error: ")), lines
            if line.startswith("{"):
                json.loads(line)


def test_an_answer_to_its_own_pipe_gets_no_extra_newline(write_flow) -> None:
    for text, answer in ((STREAMING, "hello world\n"), (BROKEN, "hello \n")):
        out = run_cli("run", str(write_flow(text)), "-v", plugins=True)
        assert out.stdout == answer, out.stdout


# --- 25: the option that named a missing file --------------------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["run", "flows/hello.yaml", "--connections", "nope.yaml"], "--connections"),
    (["run", "flows/hello.yaml", "--inputs-file", "nope.json"], "--inputs-file"),
    (["validate", "flows", "--connections", "nope.yaml"], "--connections"),
    (["db", "init", "flows/chat.yaml", "--connections", "nope.yaml"], "--connections"),
])
def test_a_missing_file_names_its_option(args: list[str], option: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert f"{option}: no such file" in out.stderr, out.stderr
    assert "validate DIR" not in out.stderr  # that hint is about flow files


@pytest.mark.parametrize("args", [["run", "flows"], ["batch", "flows", "--inputs", "x.jsonl"], ["serve", "flows"],
                                  ["chat", "flows"], ["db", "init", "flows"]], ids=" ".join)
def test_a_folder_given_as_the_flow_points_to_validate(args: list[str]) -> None:
    out = run_cli(*args)
    assert out.returncode == 2, out.stderr
    assert "'flows' is a folder" in out.stderr and "flowrunner validate flows" in out.stderr, out.stderr


def test_a_missing_flow_keeps_its_hint() -> None:
    out = run_cli("run", "nope.yaml")
    assert out.returncode == 2 and "no such file" in out.stderr and "validate DIR" in out.stderr


# --- 26: no import cycles; plugin types in `schema` and `steps` ---------------------------------------

def _import_graph() -> dict[str, set[str]]:
    """flowrunner's modules and the flowrunner modules each imports, anywhere in it: at the top,
    inside functions, under TYPE_CHECKING (a type-only import is still a dependency of the design)."""
    package = ROOT / "flowrunner"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read() -> None:
    graph = _import_graph()
    assert "flowrunner.report" in graph["flowrunner.runner"]  # a top-level import
    assert "flowrunner.engine" in graph["flowrunner.cli"] or "flowrunner.runner" in graph["flowrunner.cli"]
    assert "flowrunner.steps.context" in graph["flowrunner.steps.base"]  # under TYPE_CHECKING
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_among_flowrunners_modules() -> None:
    assert _cycles(_import_graph()) == []


def test_plugin_step_types_in_schema_and_steps(write_flow) -> None:
    schema = run_cli("schema", plugins=True)
    assert schema.returncode == 0, schema.stderr
    defs = json.loads(schema.stdout)["$defs"]
    assert "step.test_type" in defs and "test_type" in defs["step"]["properties"]["type"]["enum"]

    listed = run_cli("steps", plugins=True)
    assert listed.returncode == 0 and "test_type" in listed.stdout and "test_leak" in listed.stdout, listed.stderr
    described = run_cli("steps", "test_type", plugins=True)
    assert described.returncode == 0 and "words" in described.stdout, described.stderr

    assert run_cli("validate", str(write_flow(STREAMING)), plugins=True).returncode == 0
    typo = write_flow(STREAMING.replace("words:", "wordz:"), "typo.yaml")
    out = run_cli("validate", str(typo), plugins=True)
    assert out.returncode == 1 and "unknown property 'wordz'" in out.stdout and "did you mean 'words'" in out.stdout


def test_a_step_type_registered_late_is_in_the_schema() -> None:
    """A plugin that registers after a flow was already checked: the compiled schema follows."""
    probe = """
from flowrunner.flow.load import parse_yaml
from flowrunner.flow.schema import schema_problems
from flowrunner.steps import register
from flowrunner.steps.base import Step

text = "version: 1\\nname: x\\nsteps:\\n  - {id: a, type: late, n: 1}\\n"
before = schema_problems(*parse_yaml(text))

@register
class Late(Step):
    type_name = "late"
    summary = "registered after the first check"
    properties = {"n": {"type": "integer"}}

    async def run(self, ctx):
        yield None

after = schema_problems(*parse_yaml(text))
print([p.message for p in before], [p.message for p in after])
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.strip().split("] [")
    assert "is not a step type" in before and after == "]", out.stdout


# --- 27: what validate imports -------------------------------------------------------------------------

def test_validate_imports_nothing_a_run_needs() -> None:
    """Start-up is import time: `validate` loads the flow modules, none of the run's machinery."""
    probe = ("import sys\nfrom flowrunner.cli import main\n"
             "try:\n    main(['validate', 'flows'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    unwanted = {"hashlib", "ssl", "sqlite3", "logging", "asyncio", "structlog", "rich", "openai", "httpx2",
                "asyncpg", "pyodbc", "tiktoken", "flowrunner.engine", "flowrunner.connections.pool",
                "flowrunner.events", "flowrunner.logs", "flowrunner.sinks", "flowrunner.runner",
                # the SQL behind the history and vector steps: their schemas come from plain-data modules
                "flowrunner.history.sql", "flowrunner.vector.table", "flowrunner.vector.chunking",
                "flowrunner.secrets"}
    assert sorted(loaded & unwanted) == []
