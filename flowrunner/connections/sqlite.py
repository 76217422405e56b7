"""`sqlite` connections: a history database file through the stdlib sqlite3 driver, on worker threads.
Without `path`, the embedded default: history.sqlite3 in the user's data directory (or
$FLOWRUNNER_DATA_DIR). A relative path starts at the directory of the file that declares it."""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from ..errors import FlowRuntimeError, Problem
from ..history.sql import SQLITE
from ..history.store import ThreadedStore
from .pool import ResolvedConnection

DEFAULT_TIMEOUT = 30.0
POOL_SIZE = 4  # WAL: readers run side by side; writers take turns (BEGIN IMMEDIATE)


def default_path() -> Path:
    if os.environ.get("FLOWRUNNER_DATA_DIR"):
        return Path(os.environ["FLOWRUNNER_DATA_DIR"]).expanduser() / "history.sqlite3"
    import platformdirs

    return Path(platformdirs.user_data_dir("flowrunner")) / "history.sqlite3"


def _missing_table(e: Exception) -> bool:
    return "no such table" in str(e)


def _use_wal(db: Any, timeout: float) -> None:
    """Switch the file to WAL (it stays so). Switching takes an exclusive lock and SQLite answers
    "database is locked" at once, without its busy timeout, when another process is switching the same
    new file: so only switch when it is not WAL yet, and wait for the other process up to `timeout`."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        try:  # reading the mode also reads the header: "file is not a database" comes from here
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


async def open_sqlite(conn: ResolvedConnection, stack: AsyncExitStack) -> ThreadedStore:
    import sqlite3

    if conn.config.get("path"):
        path = Path(conn.config["path"]).expanduser()
        if not path.is_absolute():
            path = Path(conn.base_dir) / path
    else:
        if "path" in conn.missing_env:  # the flow asked for ${env.X} and X is not set: say so
            conn.require("path")
        path = default_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FlowRuntimeError(Problem(f"cannot create the data directory {path.parent}: {e.strerror or e}",
                                           hint="set FLOWRUNNER_DATA_DIR to a writable directory")) from None
    timeout = float(conn.config.get("timeout") or DEFAULT_TIMEOUT)

    def connect() -> Any:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            _use_wal(db, timeout)
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
        return db

    try:
        first = await asyncio.to_thread(connect)
    except sqlite3.Error as e:
        raise FlowRuntimeError(Problem(f"cannot open the SQLite history database {path}: {e}",
                                       path=f"connections.{conn.name}",
                                       hint="check that the directory exists and is writable, and that the file "
                                            "is an SQLite database")) from None
    store = ThreadedStore(connect, SQLITE, f"the SQLite database {path}", POOL_SIZE,
                          is_missing_table=_missing_table, is_broken=lambda e: False, begin="BEGIN IMMEDIATE",
                          describe=str)
    store.adopt(first)
    stack.push_async_callback(store.close)
    return store
