"""`flowrunner db init FLOW`: create the history tables that a flow's history steps use, on the
connections they name, before the first run (for users who keep `create:` off in production)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..errors import FlowDefinitionError, FlowRuntimeError, Problem
from ..files import echo
from .properties import DEFAULT_TABLE


def init_tables(flow_path: Path, connections_file: Path | None) -> int:
    from .. import refs
    from ..connections.pool import Connections
    from ..flow.build import load_flow_with
    from .access import store_of

    flow = load_flow_with(flow_path, connections_file)
    targets: dict[tuple[str | None, str], None] = {}
    from ..flow.model import walk

    for spec in walk(flow.steps, into_flows=True):  # branches of parallel steps and sub-flows too
        if spec.type in ("history_load", "history_save"):
            table = spec.props.get("table", DEFAULT_TABLE)
            if isinstance(table, refs.Template):
                raise FlowDefinitionError.at(f"step '{spec.id}': the table comes from a reference; db init needs "
                                             "a literal table name", spec.location)
            targets[(spec.props.get("connection"), table)] = None
    if not targets:
        raise FlowDefinitionError.at(f"{flow_path} has no history_load or history_save step: nothing to create")

    async def go() -> list[str]:
        done = []
        async with Connections(flow) as conns:
            for name, table in targets:
                conn = await (conns.get(name) if name else conns.default_history())
                store = store_of(conn)
                try:
                    await store.ensure_table(table)
                except Exception as e:  # StepFailed from the store: no step to name, so say the connection
                    raise FlowRuntimeError(Problem(f"connection '{name or 'embedded history'}': {e}")) from None
                done.append(f"{table} is ready in {store.where}")
        return done

    for line in asyncio.run(go()):
        echo(line)
    return 0
