"""Which embedding model filled a vector table. Vectors of two models are not comparable (even at the
same width), so the model is part of a chunk's identity: vector_upsert records it on the table's
embedding column (a COMMENT, so it lives and dies with the column, and a table rebuilt under the same
name starts afresh), refuses to mix in another model's vectors, and vector_search refuses to query a
table with another model's vector.

Tables from before the model was recorded carry no record: vector_upsert takes the model it runs
with as theirs from then on (with a warning), vector_search checks only the width."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import StepFailed
from .table import VectorTable

PREFIX = "flowrunner embedding: "  # the COMMENT's first words; anything else is the user's own comment
_INFO_SQL = (
    "SELECT c.oid IS NOT NULL, a.atttypmod, col_description(c.oid, a.attnum) "
    "FROM (SELECT to_regclass($1) AS oid) AS c "
    "LEFT JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped"
)


@dataclass(frozen=True)
class Model:
    """An embedding model as a step names it: what makes two vectors comparable."""

    name: str
    provider: str  # openai (also Azure deployments) | local
    dimensions: int | None  # the vectors' width: asked for (`dimensions:`), or seen; None when unknown

    def describe(self) -> str:
        width = f", {self.dimensions} dimensions" if self.dimensions else ""
        return f"{self.name} ({self.provider}{width})"

    def same_as(self, other: Model) -> bool:
        if self.name != other.name:
            return False
        return self.dimensions is None or other.dimensions is None or self.dimensions == other.dimensions


@dataclass(frozen=True)
class TableInfo:
    exists: bool
    width: int | None  # the vector column's declared width; None: no such column; <= 0: no width declared
    model: Model | None  # recorded by vector_upsert; None for a table from before, or made by hand
    foreign_comment: bool  # the column has a comment that is not ours: leave it alone


def model_of(spec: Mapping[str, Any]) -> Model:
    """The model of a step's `embedding:` mapping."""
    from .embeddings import DEFAULT_LOCAL_MODEL

    if spec.get("provider") == "local":
        return Model(str(spec.get("model") or DEFAULT_LOCAL_MODEL), "local", None)
    dims = spec.get("dimensions")
    return Model(str(spec.get("model")), "openai", int(dims) if dims else None)


async def table_info(db: Any, vt: VectorTable, *, cached: bool = True) -> TableInfo:
    """The table as the catalog describes it now. With `cached`, a table that exists and has its
    column is read once and kept on the connection object, which serve and batch keep for the whole
    process: vector_search with `vector:` needs only that (existence and width change only with a
    rebuild, which the query itself then reports). A missing table is never kept: it may be ingested
    at any moment, by another process too, and a search must find it then without a restart.

    The recorded model can change while a process runs (another process records it on a table from
    before): whoever checks it reads afresh (`cached=False`), which neither uses nor fills the cache."""
    key = (vt.sql_table, vt.columns["embedding"])
    if cached and key in db.tables:
        return db.tables[key]
    column = vt.columns["embedding"].strip('"')
    exists, width, comment = await db.pool.fetchrow(_INFO_SQL, vt.sql_table, column)
    model, foreign = None, False
    if comment:
        model = _parse(comment)
        foreign = model is None
    info = TableInfo(bool(exists), width, model, foreign)
    if cached and info.exists and info.width is not None:
        db.tables[key] = info
    return info


def _parse(comment: str) -> Model | None:
    if not comment.startswith(PREFIX):
        return None
    try:
        data = json.loads(comment[len(PREFIX):])
        dims = data.get("dimensions")  # a hand-edited "1536" is 1536: same_as compares numbers
        return Model(str(data["model"]), str(data.get("provider") or "openai"), int(dims) if dims is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, not an object, a width that is no number
        return None


def check_table(info: TableInfo, vt: VectorTable) -> None:
    """The table exists and has the embedding column: a missing one is a clear error, even when the
    query itself would only have found no rows."""
    if not info.exists:
        raise StepFailed(f"table '{vt.table}' does not exist",
                         hint="create it with a vector_upsert step (create: true), or check `table:`")
    if info.width is None:
        raise StepFailed(f"table '{vt.table}' has no column '{vt.columns['embedding'].strip(chr(34))}'",
                         hint="set `columns: {embedding: ...}` to the table's vector column")


def check_width(info: TableInfo, vt: VectorTable, dims: int) -> None:
    """The query vector's width matches the column's."""
    if info.width is not None and info.width > 0 and info.width != dims:
        raise StepFailed(f"dimension mismatch for table '{vt.table}': the query vector has {dims} dimensions, "
                         f"the column holds {info.width}",
                         hint="use the same embedding model (and `dimensions`) for search as for ingestion")


def refuse_other_model(info: TableInfo, vt: VectorTable, step: Model, *, searching: bool) -> None:
    """Before anything is embedded or written: the step's model must be the table's."""
    if info.model is None or info.model.same_as(step):
        return
    if searching:
        hint = (f"search with the model the table was filled with ({info.model.name}), or fill it again with "
                f"{step.name} (DROP TABLE {vt.table}, then vector_upsert with create: true)")
    else:
        hint = (f"to re-embed everything with {step.name}: drop the table (DROP TABLE {vt.table}) or name a new "
                f"`table:`, and run again with create: true; or keep using {info.model.name}")
    raise StepFailed(f"table '{vt.table}' holds embeddings of {info.model.describe()}; this step embeds with "
                     f"{step.describe()}: vectors of two models cannot be compared", hint=hint)


def refuse_other_width(info: TableInfo, vt: VectorTable, step: Model, width: int) -> None:
    """The vectors the model returned have the width the table's model had (a column declared
    without a width takes any)."""
    recorded = info.model.dimensions if info.model else None
    if recorded and recorded != width:
        raise StepFailed(f"table '{vt.table}' holds {recorded}-dimension embeddings of {info.model.name}; "  # type: ignore[union-attr]
                         f"{step.name} returned {width} dimensions",
                         hint="use the same model and `dimensions` as the table, or rebuild the table")


async def record(db: Any, vt: VectorTable, step: Model, width: int | None) -> bool:
    """Records the model (and the width of its vectors) on the table's embedding column. False when
    the role may not: COMMENT needs the table's owner."""
    import asyncpg

    text = PREFIX + json.dumps({"model": step.name, "provider": step.provider, "dimensions": width})
    # COMMENT takes no parameters: the server quotes the literal (%L); the names are validated and quoted.
    template = f"COMMENT ON COLUMN {vt.sql_table}.{vt.columns['embedding']} IS %L"
    try:
        statement = await db.pool.fetchval("SELECT format($1::text, $2::text)", template, text)
        await db.pool.execute(statement)
    except asyncpg.InsufficientPrivilegeError:
        return False
    finally:
        db.tables.pop((vt.sql_table, vt.columns["embedding"]), None)
    return True
