"""The three history backends the same tests run against:

- odbc:    a `sqlserver` connection through pyodbc + psqlODBC to the test PostgreSQL (the real pyodbc
           code path; no SQL Server can run here, so the dialect is PostgreSQL's);
- asyncpg: a `postgres` connection with a dsn to the same server;
- sqlite:  no connection at all: the embedded SQLite file under FLOWRUNNER_DATA_DIR."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.postgres import PgServer

__all__ = ["Backend", "backend", "odbc_string"]
BACKENDS = ("odbc", "asyncpg", "sqlite")


def odbc_string(pg: PgServer, **override: str) -> str:
    """The psqlODBC connection string for the test server (it listens on a Unix socket)."""
    parts = urlsplit(pg.dsn)
    fields = {"DRIVER": "{PostgreSQL Unicode}", "SERVER": parse_qs(parts.query)["host"][0], "PORT": "5432",
              "DATABASE": parts.path.lstrip("/") or "postgres", "UID": parts.username or "postgres", "PWD": "",
              **override}
    return ";".join(f"{k}={v}" for k, v in fields.items()) + ";"


class Backend:
    def __init__(self, name: str, pg: PgServer, data_dir: Path) -> None:
        self.name, self.pg, self.data_dir = name, pg, data_dir

    @property
    def connections(self) -> str:
        """The flow's `connections:` block (none for the embedded SQLite default)."""
        if self.name == "odbc":
            return 'connections:\n  history: {type: sqlserver, odbc: "${env.TEST_HISTORY_ODBC}"}'
        if self.name == "asyncpg":
            return 'connections:\n  history: {type: postgres, dsn: "${env.TEST_PG_DSN}"}'
        return ""

    @property
    def step_connection(self) -> str:
        return "connection: history" if self.name != "sqlite" else ""

    @property
    def env(self) -> dict[str, str]:
        return {"TEST_HISTORY_ODBC": odbc_string(self.pg), "TEST_PG_DSN": self.pg.dsn,
                "FLOWRUNNER_DATA_DIR": str(self.data_dir)}

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "history.sqlite3"

    def rows(self, table: str = "chat_history") -> list[tuple]:
        """(conversation_id, role, content, status, message_id, run_id, metadata) in saved order."""
        sql = (f"SELECT conversation_id, role, content, status, message_id, run_id, metadata "
               f"FROM {table} ORDER BY seq")
        if self.name == "sqlite":
            db = sqlite3.connect(self.sqlite_path)
            try:
                return db.execute(sql).fetchall()
            finally:
                db.close()
        return [tuple(r) for r in self.pg.execute(sql)]

    def drop(self, table: str = "chat_history") -> None:
        if self.name == "sqlite":
            if self.sqlite_path.exists():
                db = sqlite3.connect(self.sqlite_path)
                db.execute(f"DROP TABLE IF EXISTS {table}")
                db.commit()
                db.close()
        else:
            self.pg.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, pg_server: PgServer, tmp_path: Path) -> Backend:
    b = Backend(request.param, pg_server, tmp_path / "data")
    b.drop()
    b.drop("other_history")
    return b
