"""Reading what the CLI writes as JSON, one value a line: events (stdout, a jsonl sink, a tape), batch
results files, and the JSON log records on stderr."""

from __future__ import annotations

import json
from pathlib import Path


def json_lines(text: str) -> list[dict]:
    """Every line of `text` as JSON: a line that is not JSON (even a blank one) fails the test."""
    return [json.loads(line) for line in text.splitlines()]


def read_json_lines(path: Path) -> list[dict]:
    """A JSON-lines file (batch results, a jsonl sink's file), every line JSON."""
    return json_lines(path.read_text(encoding="utf-8"))


def events(stdout: str) -> list[dict]:
    """The events of `run --sink jsonl:-` (or its file's text); blank lines are passed over."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def log_lines(stderr: str) -> list[dict]:
    """The JSON log records on stderr; lines that are not records (plain text) are passed over."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def records_by_index(text: str) -> dict[int, dict]:
    """Batch results (every line a record) keyed by their item's index."""
    return {rec["index"]: rec for rec in json_lines(text)}
