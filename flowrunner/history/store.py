"""Reading and writing the chat-history table, the same way over three drivers:

- `ThreadedStore`: a blocking DB-API driver (pyodbc for sqlserver, sqlite3 for sqlite) run on its own
  small pool of worker threads, one driver connection per thread at most, so the event loop never
  waits on the database;
- `AsyncpgStore`: the postgres connection's asyncpg pool.

A save is one transaction: the conversation's lock, then one upsert per message."""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import StepFailed
from ..secrets import redact
from .sql import Dialect

Row = Sequence[Any]  # a message: the UPSERT_COLUMNS to save, or (seq, role, content, status) loaded


class TableMissing(Exception):
    """The history table does not exist (and the step did not ask to create it)."""


class HistoryStore(ABC):
    dialect: Dialect
    where: str  # for messages; never a password

    def __init__(self) -> None:
        self._created: set[str] = set()
        self._creating: asyncio.Lock | None = None

    async def ensure_table(self, table: str) -> None:
        """Runs the DDL once per store (a batch's many runs wait for the first one)."""
        if table in self._created:
            return
        self._creating = self._creating or asyncio.Lock()
        async with self._creating:
            if table not in self._created:
                await self._create(table)
                self._created.add(table)

    @abstractmethod
    async def _create(self, table: str) -> None: ...

    @abstractmethod
    async def load(self, table: str, conversation_id: str, limit: int) -> list[Row]:
        """(seq, role, content, status) rows (the driver's own row objects) of the newest `limit`
        messages, newest first."""

    @abstractmethod
    async def save(self, table: str, conversation_id: str, rows: Sequence[Row]) -> None: ...

    def lock_key(self, table: str, conversation_id: str) -> str:
        import hashlib

        return "flowrunner:" + hashlib.sha1(f"{table}\0{conversation_id}".encode()).hexdigest()


class ThreadedStore(HistoryStore):
    """A DB-API driver on a private pool of `size` threads. Connections are opened on demand (in a
    worker), kept for reuse, and dropped when the driver says they broke."""

    def __init__(self, connect: Callable[[], Any], dialect: Dialect, where: str, size: int, *,
                 is_missing_table: Callable[[Exception], bool], is_broken: Callable[[Exception], bool],
                 describe: Callable[[Exception], str], begin: str | None = None,
                 prepare: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self.dialect, self.where = dialect, where
        self._connect = connect
        from .workers import Workers

        self._workers = Workers(size, "flowrunner-db")
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._is_missing_table = is_missing_table
        self._is_broken = is_broken
        self._begin = begin  # sqlite: "BEGIN IMMEDIATE"; ODBC drivers start transactions themselves
        self._prepare = prepare  # called on the cursor before each upsert (pyodbc: setinputsizes)
        self._describe = describe  # a driver error as one line of text, without secrets

    def adopt(self, conn: Any) -> None:
        """A connection opened elsewhere (the opener's probe) joins the pool."""
        with self._lock:
            self._idle.append(conn)

    async def call(self, work: Callable[[Any], Any]) -> Any:
        return await self._workers.run(lambda: self._with_connection(work))

    def _with_connection(self, work: Callable[[Any], Any]) -> Any:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = self._connect()
            except Exception as e:
                raise StepFailed(f"cannot connect to {self.where}: {self._describe(e)}", retryable=True) from None
        try:
            result = work(conn)
        except Exception as e:
            try:
                conn.rollback()
            except Exception:  # the connection is gone with the transaction
                self._discard(conn)
                raise StepFailed(f"{self.where}: {self._describe(e)}", retryable=True) from None
            broken = self._is_broken(e)
            self._discard(conn) if broken else self._give_back(conn)
            if self._is_missing_table(e):
                raise TableMissing() from e
            raise StepFailed(f"{self.where}: {self._describe(e)}", retryable=broken) from None
        self._give_back(conn)
        return result

    def _give_back(self, conn: Any) -> None:
        with self._lock:
            self._idle.append(conn)

    @staticmethod
    def _discard(conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            pass

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self._workers.shutdown)  # a save in flight completes (bounded)
        finally:
            with self._lock:
                conns, self._idle = self._idle, []
            for conn in conns:
                self._discard(conn)

    def _lock_conversation(self, cur: Any, lock: str, key: str) -> None:
        cur.execute(lock, (key,))
        if self.dialect.name == "tsql":
            row = cur.fetchone()
            if row is None or row[0] is None or row[0] < 0:
                raise StepFailed(f"{self.where}: could not lock the conversation (sp_getapplock returned "
                                 f"{row[0] if row else None})", retryable=True)

    async def _create(self, table: str) -> None:
        statements, lock = self.dialect.create_statements(table), self.dialect.lock_sql()

        def work(conn: Any) -> None:
            cur = conn.cursor()
            if self._begin:
                cur.execute(self._begin)
            if lock:  # two runs creating the same table at once: one waits, then finds it there
                self._lock_conversation(cur, lock, self.lock_key(table, ""))
            for sql in statements:
                cur.execute(sql)
            conn.commit()

        await self.call(work)

    async def load(self, table: str, conversation_id: str, limit: int) -> list[Row]:
        sql, limit_first = self.dialect.load_sql(table)
        args = (limit, conversation_id) if limit_first else (conversation_id, limit)

        def work(conn: Any) -> list[Row]:
            cur = conn.cursor()
            cur.execute(sql, args)
            rows = cur.fetchall()
            conn.commit()  # end the read transaction: no snapshot or lock held while idle
            return rows

        return await self.call(work)

    async def save(self, table: str, conversation_id: str, rows: Sequence[Row]) -> None:
        upsert, lock = self.dialect.upsert_sql(table), self.dialect.lock_sql()
        key = self.lock_key(table, conversation_id)

        def work(conn: Any) -> None:
            cur = conn.cursor()
            if self._begin:
                cur.execute(self._begin)
            if lock:
                self._lock_conversation(cur, lock, key)
            for row in rows:
                if self._prepare:
                    self._prepare(cur)
                cur.execute(upsert, row)
            conn.commit()

        await self.call(work)


class AsyncpgStore(HistoryStore):
    def __init__(self, db: Any) -> None:  # a connections.postgres.PostgresDB
        super().__init__()
        from .sql import POSTGRES

        self.dialect, self.where, self._pool = POSTGRES, db.where, db.pool

    async def _guard(self, coro: Any) -> Any:
        import asyncpg

        from ..connections.pgerrors import lost_connection

        try:
            return await coro
        except asyncpg.UndefinedTableError as e:
            raise TableMissing() from e
        except Exception as e:
            lost = lost_connection(e, self.where)
            if lost is not None:
                raise lost from None
            if isinstance(e, asyncpg.PostgresError):
                raise StepFailed(f"{self.where}: {redact(str(e))}") from None
            raise

    async def _create(self, table: str) -> None:
        async def go() -> None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self.dialect.lock_sql(), self.lock_key(table, ""))
                for sql in self.dialect.create_statements(table):
                    await conn.execute(sql)

        await self._guard(go())

    async def load(self, table: str, conversation_id: str, limit: int) -> list[Row]:
        sql, _ = self.dialect.load_sql(table)
        return await self._guard(self._pool.fetch(sql, conversation_id, limit))

    async def save(self, table: str, conversation_id: str, rows: Sequence[Row]) -> None:
        upsert, lock = self.dialect.upsert_sql(table), self.dialect.lock_sql()
        key = self.lock_key(table, conversation_id)

        async def go() -> None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(lock, key)
                await conn.executemany(upsert, rows)

        await self._guard(go())
