from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = "tests.support.plugin_steps"

from tests.support.fixtures import *  # noqa: F401,F403  (the OpenAI-protocol test server)
from tests.support.postgres import *  # noqa: F401,F403  (PostgreSQL with pgvector)
from tests.support.history import *  # noqa: F401,F403  (the three chat-history backends)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, plugins: bool = False,
            timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, in a child process, the way a user runs it."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("FLOWRUNNER_PLUGINS", None)
    if plugins:
        full_env["FLOWRUNNER_PLUGINS"] = PLUGINS
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "flowrunner", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, input=stdin)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def write_flow(tmp_path: Path):
    def write(text: str, name: str = "flow.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
