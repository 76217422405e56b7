"""`sqlserver` connections: an ODBC connection string through pyodbc (Microsoft's ODBC Driver 18, or
FreeTDS), on a small pool of worker threads: pyodbc blocks, the event loop must not.

The SQL dialect follows the server the driver reports: T-SQL for SQL Server; PostgreSQL's when the
string names psqlODBC (how the tests run this same code path for real, with no SQL Server here)."""

from __future__ import annotations

import asyncio
import math
import re
from contextlib import AsyncExitStack
from typing import Any

from .. import secrets
from ..errors import FlowRuntimeError, Problem
from ..history.sql import POSTGRES_ODBC, TSQL, UPSERT_COLUMNS, Dialect
from ..history.store import ThreadedStore
from .pool import ResolvedConnection

DEFAULT_TIMEOUT = 30.0
DEFAULT_POOL_SIZE = 4
_PAIR = re.compile(r"\s*([^=;]+?)\s*=\s*(\{(?:[^}]|\}\})*\}|[^;]*)\s*(?:;|$)")


def parse_odbc(odbc: str) -> dict[str, str]:
    """KEY=value pairs of an ODBC connection string (keys upper-cased, {braced} values unwrapped)."""
    out = {}
    for m in _PAIR.finditer(odbc):
        value = m.group(2)
        if value.startswith("{") and value.endswith("}"):
            value = value[1:-1].replace("}}", "}")
        out[m.group(1).upper()] = value
    return out


def describe_odbc(odbc: str) -> str:
    """server/database of an ODBC string, for messages; the password never appears."""
    parts = parse_odbc(odbc)
    server = parts.get("SERVER") or parts.get("ADDR") or parts.get("ADDRESS") or parts.get("DSN")
    database = parts.get("DATABASE") or parts.get("INITIAL CATALOG")
    if not server:
        return "the configured ODBC connection"
    return f"{server}/{database}" if database else server


def odbc_message(e: Exception) -> str:
    """pyodbc's ('08001', '[08001] [unixODBC]text (0) (SQLDriverConnect)') as just the text."""
    args = getattr(e, "args", ())
    text = str(args[1]) if len(args) > 1 else str(e)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\s*\(\d+\)\s*(\(SQL\w+\))?", " ", text).strip(" ;")
    return secrets.redact(re.sub(r"\s+", " ", text))


def sqlstate(e: Exception) -> str:
    args = getattr(e, "args", ())
    return str(args[0]) if args else ""


def _input_sizes(pyodbc: Any) -> list[tuple[int, int, int]]:
    """NVARCHAR(MAX) for content and metadata (size 0), sized NVARCHAR for the rest. Without this,
    some drivers guess a length from the first value and truncate or fail on a longer one."""
    sizes = {"message_id": 64, "conversation_id": 256, "role": 32, "status": 16, "run_id": 64}
    return [(pyodbc.SQL_WVARCHAR, sizes.get(c, 0), 0) for c in UPSERT_COLUMNS]


def _dialect_of(dbms: str) -> Dialect:
    return POSTGRES_ODBC if "postgres" in dbms.lower() else TSQL


async def open_sqlserver(conn: ResolvedConnection, stack: AsyncExitStack) -> ThreadedStore:
    try:
        import pyodbc
    except ImportError as e:  # the wheel is there, the ODBC driver manager (libodbc) is not
        raise FlowRuntimeError(Problem(f"cannot load pyodbc: {e}", path=f"connections.{conn.name}",
                                       hint="install unixODBC and an ODBC driver for SQL Server (Debian: apt-get "
                                            "install unixodbc, then msodbcsql18 or tdsodbc)")) from None

    odbc = conn.require("odbc", "an ODBC connection string")
    timeout = float(conn.config.get("timeout") or DEFAULT_TIMEOUT)
    where = describe_odbc(odbc)
    sizes = _input_sizes(pyodbc)

    def connect() -> Any:
        db = pyodbc.connect(odbc, autocommit=False, attrs_before={pyodbc.SQL_ATTR_LOGIN_TIMEOUT: math.ceil(timeout)})
        try:
            db.timeout = math.ceil(timeout)  # per statement: a hung server fails the step, never hangs it
        except pyodbc.Error:
            pass  # a driver without query timeouts (psqlODBC)
        return db

    first = None
    try:
        first = await asyncio.to_thread(connect)
        dbms = await asyncio.to_thread(first.getinfo, pyodbc.SQL_DBMS_NAME)
    except pyodbc.Error as e:
        if first is not None:
            first.close()
        hint = "check SERVER, DATABASE and the credentials, and that the server is reachable"
        # IM002: no such DSN or driver entry; unixODBC says "Can't open lib" (SQLSTATE 01000) for a DRIVER=
        # name that odbcinst.ini does not list or whose library is missing.
        if sqlstate(e) == "IM002" or "Can't open lib" in str(e):
            hint = ("the ODBC driver named by DRIVER= is not installed (odbcinst -q -d lists them; Microsoft's is "
                    "'ODBC Driver 18 for SQL Server', FreeTDS's 'FreeTDS')")
        raise FlowRuntimeError(Problem(f"cannot connect to SQL Server at {where}: {odbc_message(e)}",
                                       path=f"connections.{conn.name}", hint=hint)) from None
    store = ThreadedStore(connect, _dialect_of(str(dbms)), where, int(conn.config.get("pool_size") or DEFAULT_POOL_SIZE),
                          is_missing_table=lambda e: sqlstate(e) in ("42S02", "42P01"),
                          is_broken=lambda e: sqlstate(e).startswith("08"),
                          prepare=lambda cur: cur.setinputsizes(sizes), describe=odbc_message)
    store.adopt(first)
    stack.push_async_callback(store.close)
    return store
