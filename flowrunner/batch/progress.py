"""What a batch tells the person running it: a progress bar with rate and ETA on a terminal (rich),
one JSON log line per item under cron, and a summary at the end either way."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("flowrunner.batch")


@dataclass
class Tally:
    total: int | None = None
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already in the results file (--resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    def add(self, record: dict[str, Any]) -> None:
        if record["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
        usage = record.get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)

    def summary(self, stopped: str | None = None) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {"items": self.finished + self.skipped, "ok": self.ok, "failed": self.failed, "skipped": self.skipped,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "seconds": round(elapsed, 2), "items_per_second": round(self.finished / elapsed, 2) if elapsed else None,
                **({"stopped": stopped} if stopped else {})}


def summary_text(s: dict[str, Any], output: str) -> str:
    head = f"{'stopped' if s.get('stopped') else 'done'}: {s['items']} items, {s['ok']} ok, {s['failed']} failed"
    if s["skipped"]:
        head += f", {s['skipped']} already done"
    tokens = s["prompt_tokens"] + s["completion_tokens"]
    text = (f"{head}; {tokens:,} tokens ({s['prompt_tokens']:,} prompt + {s['completion_tokens']:,} completion); "
            f"{s['seconds']:.1f} s")
    if s["items_per_second"]:
        text += f" ({s['items_per_second']:g} items/s)"
    text += f"; results in {output}"
    if s.get("stopped") and output != "stdout":
        text += "\n  hint: run the same command with --resume to finish the rest"
    return text


class LogReporter:
    """Cron, CI, containers: JSON lines on stderr (the logging set-up decides their format)."""

    def __init__(self, tally: Tally, output: str) -> None:
        self.tally, self.output = tally, output

    def __enter__(self) -> LogReporter:
        log.info("batch started", items=self.tally.total, **({"already_done": self.tally.skipped} if self.tally.skipped else {}))
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def item(self, record: dict[str, Any]) -> None:
        fields = {"index": record["index"], "status": record["status"], "latency": record["latency"],
                  "done": self.tally.finished + self.tally.skipped, "of": self.tally.total}
        if record["error"]:
            log.warning("item failed", error=record["error"], **fields)
        else:
            log.info("item finished", **fields)

    def finish(self, stopped: str | None = None) -> None:
        s = self.tally.summary(stopped)
        (log.warning if s["failed"] or stopped else log.info)("batch finished", results=self.output, **s)


class BarReporter:
    """A terminal: a rich progress bar on stderr (items, rate, ETA, failures), then the summary."""

    def __init__(self, tally: Tally, output: str) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.tally, self.output = tally, output
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("[red]{task.fields[failed]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task = self.progress.add_task("batch", total=tally.total, completed=tally.skipped, rate="", failed="")

    def __enter__(self) -> BarReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def item(self, record: dict[str, Any]) -> None:
        t = self.tally
        elapsed = time.monotonic() - t.started
        rate = f"{t.finished / elapsed:.1f} items/s" if elapsed > 0 else ""
        failed = f"{t.failed} failed" if t.failed else ""
        self.progress.update(self.task, completed=t.finished + t.skipped, rate=rate, failed=failed)
        if record["error"] and t.failed <= 3:  # the first few reasons, above the bar; the rest are in the file
            from rich.text import Text

            self.progress.console.print(Text.assemble((f"item {record['index']} failed: ", "red"), record["error"]),
                                        highlight=False, soft_wrap=True)

    def finish(self, stopped: str | None = None) -> None:
        self.progress.stop()
        self.console.print(summary_text(self.tally.summary(stopped), self.output), highlight=False, soft_wrap=True)
