"""The chat-history table, one layout for every backend, and the SQL each dialect speaks to it.

    seq              the ordering key: an identity column, so rows of a conversation read back in
                     the order they were saved (a save holds a per-conversation lock, so the two
                     messages of one turn are always adjacent)
    message_id       a stable id, unique within its conversation: saving it again updates it in place
    conversation_id  up to 256 characters; indexed together with seq
    role             user | assistant | system | tool
    content          the text, unlimited (NVARCHAR(MAX) / TEXT)
    status           complete | partial (a partial answer: the stream broke or the model failed)
    run_id           the flowrunner run that saved it
    metadata         JSON text (jsonb on PostgreSQL)
    created_at       UTC, set by the database

Table names come from YAML: validated against a strict pattern, then quoted. Values are always bound
as parameters."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import StepFailed

from ..identifiers import is_table
from .properties import MAX_CONVERSATION_ID

# Bound in this order by every dialect's upsert.
UPSERT_COLUMNS = ("message_id", "conversation_id", "role", "content", "status", "run_id", "metadata")


def table_parts(table: object) -> list[str]:
    if not is_table(table):  # fullmatch: no trailing newline either
        raise StepFailed(f"table {table!r} is not a valid name",
                         hint="use letters, digits and '_' (schema.table allowed)")
    return table.split(".")


@dataclass(frozen=True)
class Dialect:
    name: str
    open_quote: str
    close_quote: str
    placeholder: str  # "?" for DB-API drivers, "$" for asyncpg ($1, $2, ...)

    def quote(self, table: str) -> str:
        return ".".join(f"{self.open_quote}{part}{self.close_quote}" for part in table_parts(table))

    def _params(self, n: int, start: int = 1) -> list[str]:
        if self.placeholder == "$":
            return [f"${i}" for i in range(start, start + n)]
        return ["?"] * n

    @staticmethod
    def _index_base(table: str) -> str:
        return f"ix_{table_parts(table)[-1][:48]}_conversation"

    @functools.lru_cache(maxsize=64)  # built once per table: saves work on every load and save
    def create_statements(self, table: str) -> tuple[str, ...]:
        """Idempotent DDL: safe to run when the table (or its index) is already there."""
        t, ix = self.quote(table), f"{self.open_quote}{self._index_base(table)}{self.close_quote}"
        q = lambda c: f"{self.open_quote}{c}{self.close_quote}"  # noqa: E731
        if self.name == "tsql":
            columns = (f"{q('seq')} BIGINT IDENTITY(1, 1) NOT NULL PRIMARY KEY, "
                       f"{q('message_id')} NVARCHAR(64) NOT NULL, "
                       f"{q('conversation_id')} NVARCHAR({MAX_CONVERSATION_ID}) NOT NULL, "
                       f"{q('role')} NVARCHAR(32) NOT NULL, {q('content')} NVARCHAR(MAX) NOT NULL, "
                       f"{q('status')} NVARCHAR(16) NOT NULL DEFAULT 'complete', {q('run_id')} NVARCHAR(64) NULL, "
                       f"{q('metadata')} NVARCHAR(MAX) NULL, "
                       f"{q('created_at')} DATETIME2(3) NOT NULL DEFAULT SYSUTCDATETIME(), "
                       f"UNIQUE ({q('conversation_id')}, {q('message_id')})")
            return (
                f"IF OBJECT_ID(N'{t}', N'U') IS NULL CREATE TABLE {t} ({columns})",
                f"IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'{self._index_base(table)}' "
                f"AND object_id = OBJECT_ID(N'{t}')) CREATE INDEX {ix} ON {t} ({q('conversation_id')}, {q('seq')})",
            )
        if self.name == "postgres":
            columns = (f"seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id VARCHAR(64) NOT NULL, "
                       f"conversation_id VARCHAR({MAX_CONVERSATION_ID}) NOT NULL, role VARCHAR(32) NOT NULL, "
                       f"content TEXT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'complete', run_id VARCHAR(64), "
                       f"metadata JSONB, created_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
                       f"UNIQUE (conversation_id, message_id)")
        else:  # sqlite: INTEGER PRIMARY KEY is the rowid, ever increasing while rows are only added
            columns = (f"seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL, conversation_id TEXT NOT NULL, "
                       f"role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'complete', "
                       f"run_id TEXT, metadata TEXT, "
                       f"created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), "
                       f"UNIQUE (conversation_id, message_id)")
        on = t
        parts = table_parts(table)
        if self.name == "sqlite" and len(parts) == 2:  # SQLite puts the database name on the index
            ix, on = f'"{parts[0]}".{ix}', f'"{parts[1]}"'
        return (f"CREATE TABLE IF NOT EXISTS {t} ({columns})",
                f"CREATE INDEX IF NOT EXISTS {ix} ON {on} (conversation_id, seq)")

    @functools.lru_cache(maxsize=64)  # built once per table: saves work on every load and save
    def load_sql(self, table: str) -> tuple[str, bool]:
        """The newest `limit` messages of a conversation, newest first; and whether the limit is bound
        before the conversation id."""
        t = self.quote(table)
        if self.name == "tsql":
            return (f"SELECT TOP (?) [seq], [role], [content], [status] FROM {t} "
                    f"WHERE [conversation_id] = ? ORDER BY [seq] DESC"), True
        a, b = self._params(2)
        return (f"SELECT seq, role, content, status FROM {t} WHERE conversation_id = {a} "
                f"ORDER BY seq DESC LIMIT {b}"), False

    def lock_sql(self) -> str | None:
        """Serializes the saves of one conversation (its key is bound), so one turn's messages get
        adjacent seq values. SQLite needs none: BEGIN IMMEDIATE already serializes every writer."""
        if self.name == "tsql":  # sp_getapplock reports a timeout or deadlock by its return code (< 0)
            return ("SET NOCOUNT ON; DECLARE @r INT; EXEC @r = sp_getapplock @Resource = ?, @LockMode = 'Exclusive', "
                    "@LockOwner = 'Transaction'; SELECT @r")
        if self.name == "postgres":
            (p,) = self._params(1)
            return f"SELECT pg_advisory_xact_lock(hashtextextended({p}, 0))"
        return None

    @functools.lru_cache(maxsize=64)  # built once per table: saves work on every load and save
    def upsert_sql(self, table: str) -> str:
        """Insert one message, or update the one with the same message_id (a repeated save)."""
        t = self.quote(table)
        params = self._params(len(UPSERT_COLUMNS))
        if self.name == "tsql":
            source = ", ".join(f"? AS [{c}]" for c in UPSERT_COLUMNS)
            cols = ", ".join(f"[{c}]" for c in UPSERT_COLUMNS)
            values = ", ".join(f"s.[{c}]" for c in UPSERT_COLUMNS)
            return (f"MERGE INTO {t} WITH (HOLDLOCK) AS t USING (SELECT {source}) AS s "
                    f"ON t.[conversation_id] = s.[conversation_id] AND t.[message_id] = s.[message_id] "
                    f"WHEN MATCHED THEN UPDATE SET [content] = s.[content], [status] = s.[status], "
                    f"[metadata] = s.[metadata] "
                    f"WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({values});")
        if self.name == "postgres":
            params[-1] = f"CAST(CAST({params[-1]} AS text) AS jsonb)"  # JSON text, from any driver
        return (f"INSERT INTO {t} ({', '.join(UPSERT_COLUMNS)}) VALUES ({', '.join(params)}) "
                f"ON CONFLICT (conversation_id, message_id) DO UPDATE SET content = excluded.content, status = excluded.status, "
                f"metadata = excluded.metadata")


TSQL = Dialect("tsql", "[", "]", "?")
POSTGRES_ODBC = Dialect("postgres", '"', '"', "?")
POSTGRES = Dialect("postgres", '"', '"', "$")
SQLITE = Dialect("sqlite", '"', '"', "?")
