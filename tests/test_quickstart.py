"""The README's quickstart as a new user runs it: a copy of the repository in a new empty directory,
`make demo` exactly as written, with a fresh virtual environment, against the local OpenAI-protocol
server (OPENAI_BASE_URL). The other README command, `make test`, is what CI runs on a fresh clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.support.fixtures import Reply


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone would have them (tracked and new, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def git(repo: Path, *args: str) -> str:
    """git in a copy's own repository; the user's global excludes are left out, as a clone's CI has none."""
    return subprocess.run(["git", "-c", "core.excludesFile=/dev/null", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def git_snapshot(repo: Path) -> None:
    """A git repository of the copy's own, with every file staged: what a clone's `git status` starts from."""
    git(repo, "init", "-q")
    git(repo, "add", "-A")


def git_changes(repo: Path) -> list[str]:
    """`git status` lines for what changed or appeared since git_snapshot and is not ignored."""
    lines = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    return [line for line in lines if line[:2] != "A "]


def make(target: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Also without the outer `make test`'s MAKELEVEL/MAKEFLAGS: a user runs `make demo` at the top level
    # (a sub-make would print "make[1]: Leaving directory ..." after the demo's last line).
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OPENAI_", "VIRTUAL_ENV", "FLOWRUNNER_", "MAKE", "MFLAGS"))}
    return subprocess.run(["make", target], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=900)


def test_make_demo_without_a_model_server_stops_with_one_sentence(tmp_path) -> None:
    repo = fresh_copy(tmp_path / "repo")
    out = make("demo", repo, {})
    assert out.returncode != 0
    assert "Set OPENAI_API_KEY, or OPENAI_BASE_URL" in out.stderr
    assert not (repo / ".venv").exists()  # stopped before any work


def test_make_demo_in_a_new_directory_streams_an_answer(tmp_path, llm) -> None:
    repo, data = fresh_copy(tmp_path / "repo"), tmp_path / "data"  # a fresh data directory, as a new user has
    git_snapshot(repo)
    llm.script(Reply(text=["pgvector adds", " a vector type."]))
    env = {"OPENAI_BASE_URL": llm.base_url, "FLOWRUNNER_DATA_DIR": str(data)}
    try:
        out = make("demo", repo, env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        # It ends saying that the embedded PostgreSQL keeps running, where, and the command that stops it.
        last = out.stdout.rstrip().splitlines()[-2:]
        pid = (data / "postgres/postmaster.pid").read_text().split()[0]
        assert last[0] == ("The embedded PostgreSQL keeps running in the background for the next runs: "
                           f"running (pid {pid}) in {data / 'postgres'}")
        stop = re.fullmatch(r"Stop it with: (\S+ db stop) +\(its data stays; the next run starts it again\)", last[1])
        assert stop, last
        stopped = subprocess.run(stop.group(1), shell=True, cwd=repo, env={**os.environ, **env}, capture_output=True,
                                 text=True, timeout=60)
        assert stopped.stdout == f"stopped the embedded PostgreSQL in {data / 'postgres'}\n", stopped
        assert not (data / "postgres/postmaster.pid").exists()
    finally:
        subprocess.run([sys.executable, "-m", "flowrunner", "db", "stop", "--data-dir", str(data / "postgres")],
                       capture_output=True, timeout=60)
    assert "upserted: " in out.stdout
    assert "pgvector adds a vector type." in out.stdout
    assert (repo / ".venv" / "bin" / "flowrunner").exists()
    assert llm.embedding_requests, "the docs and the question were embedded"
    question = llm.chat_requests[-1].json["messages"][-1]["content"]
    assert "(source: ../docs/" in question and "remember a conversation" in question
    assert (data / "history.sqlite3").exists()  # the turn was saved to the embedded SQLite history
    assert git_changes(repo) == []  # what it installed and wrote is ignored by git, or outside the repository
