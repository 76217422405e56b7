"""A batch's items: one flow run per JSONL line or CSV row, read lazily, mapped to the flow's inputs.

An item's index is its position among the data lines (blank lines do not count), so the same file
gives the same indexes on every run: `--resume` depends on it. A row that cannot become inputs
(invalid JSON, a missing column, a value of the wrong type) is an item that failed, not a crash.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import FlowDefinitionError, Location
from ..flow.inputs import resolve_inputs
from ..flow.model import Flow


@dataclass(frozen=True)
class Item:
    index: int
    line: int  # 1-based line in the inputs file where the item starts
    inputs: Mapping[str, Any] = field(default_factory=dict)  # the flow's inputs, coerced, defaults filled
    error: str | None = None  # why the row could not become inputs
    row: Mapping[str, Any] | None = None  # with an error: the row as read, for the results file


def parse_map(pairs: tuple[str, ...], flow: Flow) -> dict[str, str]:
    """`--map question=prompt`: flow input <- column (or JSON key)."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise FlowDefinitionError.at(f"--map {pair!r}: expected INPUT=COLUMN", hint="for example --map question=prompt")
        if name.strip() not in flow.inputs:
            raise FlowDefinitionError.at(f"--map {pair!r}: the flow has no input '{name.strip()}'",
                                         hint=f"its inputs: {', '.join(flow.inputs) or 'none'}")
        mapping[name.strip()] = column.strip()
    return mapping


class ItemReader:
    """Iterating yields Items; `ignored` names the columns that feed no input (reported once)."""

    def __init__(self, path: Path, flow: Flow, mapping: Mapping[str, str], constants: Mapping[str, str],
                 fmt: str | None = None) -> None:
        self.path = path
        self.flow = flow
        self.mapping = dict(mapping)
        self.constants = dict(constants)  # -i NAME=VALUE: the same for every item, under the row's values
        self.format = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
        self.ignored: set[str] = set()
        self._columns = set(mapping.values())

    def check(self) -> None:
        """Fail before any item runs when the file cannot be read, or a CSV header lacks a --map column."""
        with self._open() as f:
            if self.format == "csv":
                header = self._csv_reader(f).fieldnames or []
                missing = [c for c in self.mapping.values() if c not in header]
                if missing:
                    raise FlowDefinitionError.at(f"--map names column {missing[0]!r}, which the header does not have",
                                                 Location(str(self.path), 1, 1), hint=f"the columns: {', '.join(header)}")

    def count(self) -> int:
        """How many items the file holds (a quick pass, for the progress bar)."""
        with self._open() as f:
            if self.format == "csv":
                return sum(1 for _ in self._csv_reader(f))
            return sum(1 for line in f if line.strip())

    def __iter__(self) -> Iterator[Item]:
        with self._open() as f:
            if self.format == "csv":
                yield from self._csv(f)
            else:
                yield from self._jsonl(f)

    def _open(self) -> TextIO:
        try:
            return self.path.open(encoding="utf-8-sig", newline="" if self.format == "csv" else None)
        except OSError as e:
            raise FlowDefinitionError.at(f"cannot read the inputs file: {e.strerror or e}", Location(str(self.path))) from None

    def _jsonl(self, f: TextIO) -> Iterator[Item]:
        index = 0
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield self._bad(index, number, e.colno, f"invalid JSON: {e.msg}")
            else:
                if isinstance(row, dict):
                    yield self._item(index, number, row, from_text=False)
                else:
                    yield self._bad(index, number, 1, "expected a JSON object ({\"input\": value, ...}) on each line")
            index += 1

    def _csv_reader(self, f: TextIO) -> csv.DictReader[str]:
        dialect: Any = "excel-tab" if self.path.suffix.lower() == ".tsv" else "excel"
        return csv.DictReader(f, dialect=dialect)

    def _csv(self, f: TextIO) -> Iterator[Item]:
        reader = self._csv_reader(f)
        header = reader.fieldnames or []
        line = reader.line_num + 1
        for index, row in enumerate(reader):
            if None in row or None in row.values():
                yield self._bad(index, line, 1, f"expected {len(header)} columns, as in the header")
            else:
                yield self._item(index, line, row, from_text=True)
            line = reader.line_num + 1

    def _item(self, index: int, line: int, row: dict[str, Any], *, from_text: bool) -> Item:
        given: dict[str, Any] = dict(self.constants)
        text = set(self.constants)  # the names whose values are text to parse (CSV cells, -i values)
        for name, column in self.mapping.items():
            if column in row:
                given[name] = row[column]
                text.discard(name)
        for key, value in row.items():
            if key in self.flow.inputs and key not in self.mapping:
                given[key] = value
                text.discard(key)
            elif key not in self._columns and key not in self.flow.inputs:
                self.ignored.add(key)
        if from_text:  # an empty CSV cell leaves an input that has a default at its default
            given = {k: v for k, v in given.items() if v != "" or not self.flow.inputs[k].has_default}
        try:
            inputs = resolve_inputs(self.flow, given, from_text=frozenset(given) if from_text else frozenset(text))
        except FlowDefinitionError as e:
            reasons = "; ".join(p.message for p in e.problems)
            return self._bad(index, line, 1, reasons, row)
        return Item(index, line, inputs)

    def _bad(self, index: int, line: int, col: int, message: str, row: Mapping[str, Any] | None = None) -> Item:
        return Item(index, line, error=f"{Location(str(self.path), line, col)}: {message}", row=row)
