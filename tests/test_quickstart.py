"""The README's quickstart as a new user runs it: a copy of the repository in a new empty directory,
`make demo` exactly as written, with a fresh virtual environment, against the local OpenAI-protocol
server (OPENAI_BASE_URL). The other README command, `make test`, is what CI runs on a fresh clone."""

from __future__ import annotations

import os
import shutil
import subprocess
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


def make(target: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VIRTUAL_ENV", "FLOWRUNNER_"))}
    return subprocess.run(["make", target], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=900)


def test_make_demo_without_a_model_server_stops_with_one_sentence(tmp_path) -> None:
    repo = fresh_copy(tmp_path / "repo")
    out = make("demo", repo, {})
    assert out.returncode != 0
    assert "Set OPENAI_API_KEY, or OPENAI_BASE_URL" in out.stderr
    assert not (repo / ".venv").exists()  # stopped before any work


def test_make_demo_in_a_new_directory_streams_an_answer(tmp_path, pg, llm) -> None:
    repo = fresh_copy(tmp_path / "repo")
    (pg.root / "history.sqlite3").unlink(missing_ok=True)
    llm.script(Reply(text=["pgvector adds", " a vector type."]))
    out = make("demo", repo, {"OPENAI_BASE_URL": llm.base_url, "FLOWRUNNER_DATA_DIR": str(pg.root)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "upserted: " in out.stdout
    assert "pgvector adds a vector type." in out.stdout
    assert (repo / ".venv" / "bin" / "flowrunner").exists()
    assert llm.embedding_requests, "the docs and the question were embedded"
    question = llm.chat_requests[-1].json["messages"][-1]["content"]
    assert "(source: ../docs/" in question and "remember a conversation" in question
    assert (pg.root / "history.sqlite3").exists()  # the turn was saved to the embedded SQLite history
