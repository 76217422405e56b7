"""A vector table's identifiers (validated, then quoted), metric operators, SQL and DDL.

Identifiers come from YAML: they are checked against a strict pattern (the JSON Schema does it at
load time, `ident` again at run time for values that came through references) and then always
double-quoted. Values are always bound as parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import StepFailed
from ..identifiers import is_ident, is_table
from .properties import DEFAULT_COLUMNS, METRICS  # the schema's side, which `validate` imports alone


def quote(name: str, what: str = "identifier") -> str:
    if not is_ident(name):
        raise StepFailed(f"{what} {name!r} is not a valid name",
                         hint="use letters, digits and '_', starting with a letter or '_' (at most 63)")
    return f'"{name}"'


@dataclass(frozen=True)
class VectorTable:
    table: str  # as written, for messages
    sql_table: str  # quoted
    columns: Mapping[str, str]  # role -> quoted column

    @classmethod
    def from_props(cls, props: Mapping[str, Any]) -> VectorTable:
        table = props["table"]
        if not is_table(table):
            raise StepFailed(f"table {table!r} is not a valid name",
                             hint="use letters, digits and '_' (schema.table allowed)")
        names = {**DEFAULT_COLUMNS, **(props.get("columns") or {})}
        cols = {role: quote(col, f"column {role}") for role, col in names.items()}
        return cls(table, ".".join(quote(part, "table") for part in table.split(".")), cols)

    def search_sql(self, metric: str, filter_param: str | None, threshold: str | None) -> str:
        """Best first. The ORDER BY uses the metric's operator on the column itself, so an HNSW or
        IVFFlat index built with the matching opclass serves the query; the score threshold is
        applied outside the LIMIT for the same reason."""
        op = METRICS[metric][0]
        c = self.columns
        where = f" WHERE {c['metadata']} @> {filter_param}::jsonb" if filter_param else ""
        outer = f" WHERE {threshold}" if threshold else ""
        return (
            f"SELECT id, content, metadata, distance FROM ("
            f"SELECT {c['id']}::text AS id, {c['content']} AS content, {c['metadata']} AS metadata, "
            f"{c['embedding']} {op} $1 AS distance FROM {self.sql_table}{where} "
            f"ORDER BY {c['embedding']} {op} $1 LIMIT $2) AS hits{outer} ORDER BY distance"
        )

    def create_sql(self, dims: int, metric: str) -> list[str]:
        c = self.columns
        index = quote(f"{self.table.split('.')[-1]}_{DEFAULT_COLUMNS['embedding']}_hnsw"[:63], "index")
        return [
            "CREATE EXTENSION IF NOT EXISTS vector",
            f"CREATE TABLE IF NOT EXISTS {self.sql_table} ({c['id']} text PRIMARY KEY, {c['content']} text NOT NULL, "
            f"{c['metadata']} jsonb NOT NULL DEFAULT '{{}}'::jsonb, {c['embedding']} vector({int(dims)}) NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {index} ON {self.sql_table} USING hnsw ({c['embedding']} {METRICS[metric][1]})",
        ]

    def upsert_sql(self) -> str:
        c = self.columns
        return (
            f"INSERT INTO {self.sql_table} ({c['id']}, {c['content']}, {c['metadata']}, {c['embedding']}) "
            f"VALUES ($1, $2, $3, $4) ON CONFLICT ({c['id']}) DO UPDATE SET {c['content']} = EXCLUDED.{c['content']}, "
            f"{c['metadata']} = EXCLUDED.{c['metadata']}, {c['embedding']} = EXCLUDED.{c['embedding']}"
        )

    def stale_sql(self) -> str:
        """Deletes the chunks of the given files ($1: their paths; a chunk's id is the path, '#' and its
        number) that are not among the current chunk ids ($2): what is left over from a longer version
        of the file. One scan, with a hashed IN on the id without its '#number'."""
        c = self.columns
        return (f"DELETE FROM {self.sql_table} WHERE regexp_replace({c['id']}::text, '#[0-9]+$', '') = ANY($1::text[]) "
                f"AND NOT ({c['id']}::text = ANY($2::text[]))")

    def existing_sql(self) -> str:
        c = self.columns
        return (f"SELECT {c['id']}::text, md5({c['content']}), {c['metadata']} FROM {self.sql_table} "
                f"WHERE {c['id']}::text = ANY($1::text[])")


def explain_db_error(e: BaseException, vt: VectorTable, where: str) -> StepFailed:
    """asyncpg's errors, said in terms of the flow: which table, column or dimension is wrong."""
    import asyncpg

    text = str(e)
    if isinstance(e, asyncpg.UndefinedTableError):
        return StepFailed(f"table '{vt.table}' does not exist in {where}",
                          hint="create it with a vector_upsert step (create: true), or check `table:`")
    if isinstance(e, asyncpg.UndefinedColumnError):
        return StepFailed(f"{text} (table '{vt.table}')", hint="set `columns:` to the table's column names")
    if isinstance(e, asyncpg.UndefinedObjectError) and "vector" in text:
        return StepFailed(f"the pgvector extension is not installed in {where}",
                          hint="run CREATE EXTENSION vector (or a vector_upsert step with create: true)")
    if "different vector dimensions" in text or "expected" in text and "dimensions" in text:
        return StepFailed(f"dimension mismatch for table '{vt.table}': {text}",
                          hint="use the same embedding model (and `dimensions`) for search as for ingestion")
    from ..connections.pgerrors import lost_connection

    lost = lost_connection(e, where)
    if lost is not None:
        return lost
    return StepFailed(f"PostgreSQL error on table '{vt.table}': {text}")
