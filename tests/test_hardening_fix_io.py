"""Issue 17, review of the I/O hardening: only a write to stdout is a closed stdout, and logging never
raises.

Real processes and real file descriptors: a socket whose peer is gone gives a real EPIPE (not from
stdout), and stdout and stderr are one pipe whose reader has left (`2>&1 | head`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT

# A command that fails the way a database or HTTP socket does when its peer went away: EPIPE, with
# no file name in the error. It prints a line first, and the script writes one more after the
# command line is done, so the test sees whether stdout was taken away.
SOCKET_EPIPE = textwrap.dedent("""
    import os, socket, sys

    from flowrunner import cli
    from flowrunner.files import echo

    @cli.cli.command()
    def broken_socket() -> None:
        echo("before")
        ours, theirs = socket.socketpair()
        theirs.close()
        ours.sendall(b"x" * 65536)  # BrokenPipeError: Python ignores SIGPIPE

    try:
        cli.main(["broken-socket"])
    except SystemExit as e:
        sys.stdout.flush()
        os.write(1, b"stdout still works\\n")
        raise
""")


def run_script(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWRUNNER_PLUGINS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, text=True, timeout=60,
                          **kwargs)


def test_a_broken_socket_is_an_error_with_its_type_not_a_closed_stdout() -> None:
    out = run_script(SOCKET_EPIPE, capture_output=True)
    assert out.returncode == 1, (out.returncode, out.stderr)  # not 141, the closed-stdout exit
    assert "Error: BrokenPipeError: Broken pipe" in out.stderr
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == "before\nstdout still works\n"  # stdout was not pointed at /dev/null


def test_a_closed_stdout_is_still_141_quietly() -> None:
    """The same command, with stdout a pipe nobody reads: its own write is what fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = run_script(SOCKET_EPIPE, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert out.returncode == 141, out.stderr
    assert "Error" not in out.stderr and "Exception ignored" not in out.stderr


# An answer half streamed to stdout, which is also stderr (`2>&1`), when the reader leaves: a log
# line (from the main thread or a history worker thread) must not raise; the sink's own next write
# still reports the closed stdout. What happened is written to a file the test reads.
LOG_ON_CLOSED_PIPE = textwrap.dedent("""
    import os, sys, threading

    import structlog

    from flowrunner import logs
    from flowrunner.events import TextDelta
    from flowrunner.files import OutputClosed
    from flowrunner.sinks.stdout import StdoutSink

    report = open(sys.argv[1], "w")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    logs.configure("json", "info")
    log = structlog.get_logger("test")
    sink = StdoutSink()
    sink.handle(TextDelta("answer", "half an answer"))  # no newline yet: the line is open
    os.close(read_end)  # `| head` has what it wanted

    def log_line(where):
        try:
            log.warning("a log line", where=where)
            report.write(f"{where}: logged\\n")
        except BaseException as e:
            report.write(f"{where}: raised {type(e).__name__}\\n")

    thread = threading.Thread(target=log_line, args=("thread",))
    thread.start()
    thread.join()
    log_line("main")
    try:
        sink.handle(TextDelta("answer", " and the rest"))
        report.write("sink: wrote\\n")
    except OutputClosed:
        report.write("sink: OutputClosed\\n")
    report.close()
""")


def test_logging_never_raises_when_stdout_and_stderr_are_one_closed_pipe(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    out = run_script(LOG_ON_CLOSED_PIPE, str(report), capture_output=True)
    assert out.returncode == 0, out.stderr
    assert report.read_text().splitlines() == ["thread: logged", "main: logged", "sink: OutputClosed"]


# --- validate: a check that fails with a bug's message is masked before it is cut ---------------------

BUGGY_PLUGIN = '''
from flowrunner import secrets
from flowrunner.steps import register
from flowrunner.steps.base import Step

KEY = "sk-proj-Validate9Bug0Key7Straddling"


@register
class BuggyCheck(Step):
    type_name = "buggy_check"
    summary = "test only: its check fails with a message that holds a secret"

    @classmethod
    def check(cls, spec, flow):
        secrets.register(KEY)  # e.g. a check that read a key to test it
        raise RuntimeError("x" * 190 + " " + KEY)  # the 200-character cut falls inside the key

    async def run(self, ctx):
        yield None
'''


def test_validate_masks_an_internal_error_before_cutting_it(tmp_path: Path) -> None:
    (tmp_path / "buggy_plugin.py").write_text(BUGGY_PLUGIN)
    flow = tmp_path / "flow.yaml"
    flow.write_text("version: 1\nname: buggy\nsteps:\n  - {id: a, type: buggy_check}\n")
    env = {k: v for k, v in os.environ.items() if k != "FLOWRUNNER_PLUGINS"}
    env.update(FLOWRUNNER_PLUGINS="buggy_plugin",
               PYTHONPATH=os.pathsep.join((str(tmp_path), str(ROOT), env.get("PYTHONPATH", ""))))
    out = subprocess.run([sys.executable, "-m", "flowrunner", "validate", str(flow)], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "internal error while checking this file: RuntimeError" in out.stdout, out.stdout
    assert "sk-proj-" not in out.stdout + out.stderr  # not even the start of the key
