"""What history_load and history_save share at run time: finding the store (their common
properties are in properties.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import StepFailed
from .properties import DEFAULT_TABLE

if TYPE_CHECKING:  # store.py imports asyncio: loaded only when a step runs, never by `validate`
    from ..steps.context import StepContext
    from .store import HistoryStore


def store_of(conn: Any) -> HistoryStore:
    """The history store of an opened connection: sqlserver and sqlite ones are stores; a postgres
    one has a store on its pool."""
    return conn.history() if hasattr(conn, "history") else conn


async def open_store(ctx: StepContext) -> tuple[HistoryStore, str]:
    """The step's store and table, created first when the step says `create: true`."""
    p = ctx.props
    store = store_of(await (ctx.connection() if p.get("connection") else ctx.run.connections.default_history()))
    table = p.get("table") or DEFAULT_TABLE
    if p.get("create"):
        await store.ensure_table(table)
    return store, table


def missing_table(table: str, store: HistoryStore) -> StepFailed:
    return StepFailed(f"the history table {table} does not exist in {store.where}",
                      hint="add `create: true` to the step, or run `flowrunner db init FLOW` once")


async def guarded(coro: Any, table: str, store: HistoryStore) -> Any:
    try:
        return await coro
    except Exception as e:
        from .store import TableMissing

        if isinstance(e, TableMissing):
            raise missing_table(table, store) from None
        raise
