"""`flowrunner batch FLOW --inputs FILE`: set-up, the run, the summary and the exit code."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from ..errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, FlowDefinitionError


def run_batch(flow_path: Path, inputs_path: Path, fmt: str | None, maps: tuple[str, ...], pairs: tuple[str, ...],
              output: Path | None, concurrency: int, rate_limits: tuple[str, ...], resume: bool, fail_fast: bool,
              connections_file: Path | None, obj: dict[str, Any]) -> int:
    from .. import logs
    from ..errors import did_you_mean
    from ..flow.build import load_flow_with
    from ..llm.limits import Limits, RateLimiter
    from ..runner import parse_pairs
    from .items import ItemReader, parse_map
    from .progress import BarReporter, LogReporter, Tally
    from .results import Results
    from .run import Batch

    if resume and output is None:
        raise FlowDefinitionError.at("--resume needs --output: the results file to continue",
                                     hint="for example --output results.jsonl --resume")
    flow = load_flow_with(flow_path, connections_file)
    constants = parse_pairs(pairs)
    for name in constants:
        if name not in flow.inputs:
            raise FlowDefinitionError.at(f"-i {name}=...: the flow has no input '{name}'",
                                         hint=did_you_mean(name, flow.inputs) or f"its inputs: {', '.join(flow.inputs)}")
    reader = ItemReader(inputs_path, flow, parse_map(maps, flow), constants, fmt)
    reader.check()
    if output is not None and output.resolve() == inputs_path.resolve():
        raise FlowDefinitionError.at("--output is the inputs file", hint="write the results to another file")
    limits = Limits.parse(rate_limits)
    results = Results(output, resume)
    results.open()
    where = str(output) if output else "stdout"
    tally = Tally(total=reader.count(), skipped=len(results.done))
    bar = sys.stderr.isatty() and obj.get("log_format") != "json" and (output is not None or not sys.stdout.isatty())
    logs.configure(obj.get("log_format"), obj.get("log_level"), quiet_runs=obj.get("log_level") is None)
    _warn_before(reader, results)
    reporter = (BarReporter if bar else LogReporter)(tally, where)
    batch = Batch(flow, reader, results, tally, reporter, concurrency,
                  RateLimiter(limits) if limits else None, fail_fast)
    stopped: str | None = "error"
    try:
        with reporter:
            stopped = asyncio.run(_main(batch))
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        results.close()
        reporter.finish(stopped)
    if stopped:
        return EXIT_INTERRUPTED if stopped == "interrupted" else EXIT_TERMINATED
    return EXIT_FAILED if tally.failed else EXIT_OK


def _warn_before(reader: Any, results: Any) -> None:
    """What the person should know before the items run (and scroll by): ignored columns, and results
    lines --resume dropped because their index is not an item number."""
    from .progress import log

    if reader.ignored:
        log.warning("columns that feed no input were ignored", columns=sorted(reader.ignored),
                    hint="--map INPUT=COLUMN feeds an input from a column of another name")
    for number in results.unnumbered:
        log.warning("a results line is not an item's record: its index is not an item number; it is dropped",
                    file=str(results.path), line=number, hint="the item it was for runs again")


async def _main(batch: Any) -> str | None:
    from ..runner import cancel_on_sigterm

    terminated = cancel_on_sigterm()
    try:
        await batch.run()
    except asyncio.CancelledError:
        if terminated():
            return "terminated"
        raise
    return None
