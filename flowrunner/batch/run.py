"""`flowrunner batch`: N workers take items in order and run the flow on each, sharing one set of
connections (pools, the SDK client) and one rate limiter; each result is appended as it finishes."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from .. import secrets
from ..errors import FlowDefinitionError, FlowError
from ..flow.model import Flow
from .items import Item, ItemReader
from .progress import Tally
from .results import Results, fingerprint


class _FailFast(Exception):
    pass


@dataclass
class Batch:
    flow: Flow
    reader: ItemReader
    results: Results
    tally: Tally
    reporter: Any  # progress.BarReporter | progress.LogReporter
    concurrency: int = 4
    limiter: Any = None  # llm.limits.RateLimiter
    fail_fast: bool = False
    _batch_key: str | None = field(default=None, init=False, repr=False)
    _in_flight: set[Any] = field(default_factory=set, init=False, repr=False)  # the items' engine.Run objects

    async def run(self) -> None:
        """Runs every item not done yet. Cancelled (Ctrl-C, SIGTERM) or stopped by --fail-fast, the
        items in flight are not recorded: --resume runs them again."""
        from ..connections.pool import Connections
        from ..engine import check_connections
        from ..llm.limits import LIMITER

        LIMITER.set(self.limiter)  # this task's context: every worker and model request inherits it
        items = iter(self.reader)
        try:
            async with Connections(self.flow) as conns, asyncio.TaskGroup() as group:
                # Every unset ${env.X} of the connections the steps use, at once and once per batch;
                # each is opened before any item: a wrong setting stops the batch here, and no item
                # pays for the set-up.
                for name in check_connections(self.flow, conns):
                    await conns.get(name)
                for _ in range(self.concurrency):
                    group.create_task(self._worker(items, conns))
        except* _FailFast:
            pass
        except* FlowError as eg:
            raise eg.exceptions[0] from None
        finally:
            if hasattr(items, "close"):
                items.close()  # type: ignore[attr-defined]

    async def _worker(self, items: Iterator[Item], conns: Any) -> None:
        for item in items:  # one shared iterator: each item goes to exactly one worker
            if item.index in self.results.done:
                self._check_same(item)
                continue
            record = await self._run_item(item, conns)
            self.results.write(record)
            self.tally.add(record)
            self.reporter.item(record)
            if self.fail_fast and record["status"] != "ok":
                for run in self._in_flight:  # the other items stop at once: no run_on_failure grace
                    run.grace_on_cancel = False
                raise _FailFast

    async def _run_item(self, item: Item, conns: Any) -> dict[str, Any]:
        from ..engine import Run
        from ..events import Usage, add_usage

        record: dict[str, Any] = {"index": item.index, "inputs": dict(item.row or item.inputs), "outputs": {},
                                  "status": "failed", "error": item.error, "usage": None, "latency": 0.0}
        if item.error:
            return record
        started = time.monotonic()
        # Ctrl-C / SIGTERM: each item in flight still runs its run_on_failure steps (--fail-fast: not).
        run = Run(self.flow, item.inputs, connections=conns, turn_id=self._turn_id(item), grace_on_cancel=True)
        usage: dict[str, Any] = {}
        self._in_flight.add(run)
        try:
            async with aclosing(run.events()) as events:
                async for event in events:
                    if type(event) is Usage:
                        add_usage(usage, event.usage)
                        if self.limiter is not None:
                            self.limiter.charge(event.usage.get("total_tokens", 0))
        finally:
            self._in_flight.discard(run)
        setup = next((e for e in run.errors if isinstance(e, FlowDefinitionError)), None)
        if setup is not None:  # e.g. a connection's env var is not set: every item would fail the same way
            raise setup
        record.update(run_id=run.run_id, outputs=run.outputs, status=run.status, usage=usage or None,
                      latency=round(time.monotonic() - started, 3))
        if run.errors:
            record["error"] = "\n".join(secrets.redact(p.format()) for e in run.errors for p in e.problems)
        return record

    def _turn_id(self, item: Item) -> str | None:
        """The turn id history_save steps use for an item: the same each time this batch (its inputs file
        and results file) runs the item, so an item that saved its turn and then failed, run again by
        --resume, replaces that turn instead of adding it twice. Results on stdout cannot be resumed:
        the run id, as for `flowrunner run`."""
        if self.results.path is None:
            return None
        if self._batch_key is None:
            where = f"{self.reader.path.resolve()}\0{self.results.path.resolve()}"
            self._batch_key = hashlib.sha256(where.encode()).hexdigest()[:16]
        return f"batch-{self._batch_key}-{item.index}"

    def _check_same(self, item: Item) -> None:
        """An item --resume skips must be the one that ran: else the inputs file changed since."""
        if item.error is None and fingerprint(dict(item.inputs)) != self.results.done[item.index]:
            raise FlowDefinitionError.at(
                f"{self.results.path} holds item {item.index} with other inputs than "
                f"{self.reader.path}:{item.line} has now", hint="the inputs file changed since that batch ran: "
                "give a new --output (or remove the old results) to start over")
