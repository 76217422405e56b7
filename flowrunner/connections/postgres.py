"""`postgres` connections: one asyncpg pool per run (or batch), the pgvector codec registered on
every connection so vectors travel in binary. Without `dsn`, the embedded server."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from .. import secrets
from ..errors import FlowRuntimeError, Problem
from .pool import ResolvedConnection

DEFAULT_POOL_SIZE = 10
DEFAULT_TIMEOUT = 30.0


@dataclass
class PostgresDB:
    name: str
    pool: Any  # asyncpg.Pool
    where: str  # for messages: host/db or "the embedded PostgreSQL", never a password
    embedded: bool
    tables: dict[tuple[str, str], Any] = field(default_factory=dict)  # (table, column) -> vector.identity.TableInfo
    _history: Any = None

    def history(self) -> Any:
        """The chat-history store on this pool (history_load / history_save)."""
        if self._history is None:
            from ..history.store import AsyncpgStore

            self._history = AsyncpgStore(self)
        return self._history

    async def enable_vectors(self) -> None:
        """CREATE EXTENSION vector, then renew the pool's connections so each registers the codec."""
        await self.pool.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await self.pool.expire_connections()


def describe_dsn(dsn: str) -> str:
    """host:port/db of a DSN, for error messages; the password never appears."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        return f"{host}{':' + str(parts.port) if parts.port else ''}{parts.path or ''}"
    except ValueError:
        return "the configured dsn"


class _DriverLog(logging.Handler, logging.Filter):
    """asyncpg reports through `logging`, with tracebacks: its pool failing to reconnect while the
    server is down (once a second or so), and, through the event loop's exception handler (the
    `asyncio` logger), what a connection saw with nobody waiting for it. Each becomes one structured
    warning through the same logger as the rest, redacted; never a traceback on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        import structlog

        error = record.exc_info[1] if record.exc_info else None
        fields = {"error": f"{type(error).__name__}: {error}"} if error is not None else {}
        structlog.get_logger("flowrunner").warning(f"PostgreSQL driver: {record.getMessage().splitlines()[0]}",
                                                   **fields)

    def filter(self, record: logging.LogRecord) -> bool:  # on the `asyncio` logger: keep what is not asyncpg's
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__module__.startswith("asyncpg") or "asyncpg" in record.getMessage():
            self.emit(record)
            return False
        return True


def _route_driver_log() -> None:
    logger = logging.getLogger("asyncpg")
    if not any(isinstance(h, _DriverLog) for h in logger.handlers):
        route = _DriverLog()
        logger.addHandler(route)
        logger.propagate = False  # not also to the root logger's last-resort handler (the traceback)
        logging.getLogger("asyncio").addFilter(route)


async def _init_connection(conn: Any) -> None:
    import json

    from pgvector.asyncpg import register_vector

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    try:
        await register_vector(conn)
    except ValueError:
        pass  # no vector extension yet: vector steps say so, or create it with `create: true`


async def open_postgres(conn: ResolvedConnection, stack: AsyncExitStack) -> PostgresDB:
    import asyncpg

    from . import embedded_pg

    dsn = conn.config.get("dsn")
    timeout = float(conn.config.get("timeout") or DEFAULT_TIMEOUT)
    if dsn:
        where, embedded = describe_dsn(dsn), False
    else:
        if "dsn" in conn.missing_env:
            conn.require("dsn", "a dsn")  # the flow asked for ${env.X} and X is not set: say so
        directory = embedded_pg.data_dir(conn.config.get("data_dir"))
        try:
            dsn = await asyncio.to_thread(embedded_pg.start, directory)
        except Exception as e:  # pgserver raises plain exceptions; the log is in the data dir
            raise FlowRuntimeError(Problem(f"cannot start the embedded PostgreSQL in {directory}: {e}",
                                           hint=f"see {directory / 'log'}; `flowrunner db stop` resets it")) from e
        where, embedded = f"the embedded PostgreSQL ({directory})", True
    secrets.register(dsn)
    _route_driver_log()
    try:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=int(conn.config.get("pool_size") or DEFAULT_POOL_SIZE),
                                         init=_init_connection, timeout=timeout, command_timeout=None)
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise FlowRuntimeError(Problem(f"cannot connect to PostgreSQL at {where}: {secrets.redact(str(e)) or type(e).__name__}",
                                       path=f"connections.{conn.name}",
                                       hint="check the dsn, and that the server is running and reachable")) from None
    stack.push_async_callback(pool.close)
    db = PostgresDB(conn.name, pool, where, embedded)
    if embedded:
        await db.enable_vectors()  # our own server: pgvector is always there
    return db
