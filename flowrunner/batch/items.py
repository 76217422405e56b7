"""A batch's items: one flow run per JSONL line or CSV row, read lazily, mapped to the flow's inputs.

An item's index is its position among the data lines (blank lines do not count), so the same file
gives the same indexes on every run: `--resume` depends on it. A row that cannot become inputs
(invalid JSON, a number too long to read, a CSV row the csv module rejects, a missing column, a value
of the wrong type) is an item that failed, not a crash. What is wrong for every row (a required input
that no column and no -i feeds) is an error before the first item.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import FlowDefinitionError, Location, Problem
from ..flow.inputs import resolve_inputs
from ..flow.load import IntegerTooLong, read_int
from ..flow.model import Flow

# A CSV cell may hold a whole document: the csv module's default limit (128 KiB) would end the batch at
# the first long cell. Cells are still bounded by the file's size. 2**31 - 1: a C long everywhere.
_CSV_FIELD_LIMIT = 2**31 - 1
_UNREADABLE = (ValueError, OverflowError, RecursionError)  # json/int/float on hostile values


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
        self.ignored: set[str] = set()  # found by check(), before the run, so they are reported first
        self._columns = set(mapping.values())
        self._count: int | None = None

    def check(self) -> None:
        """Fail before any item runs when the file cannot be read, a CSV header lacks a --map column, or a
        required input is fed by no column (no key of any JSONL line) and no -i; note the ignored columns.
        Counts the items on the way (one pass)."""
        with self._open() as f:
            if self.format == "csv":
                reader = self._csv_reader(f)
                header = reader.fieldnames or []
                missing = [c for c in self.mapping.values() if c not in header]
                if missing:
                    raise FlowDefinitionError.at(f"--map names column {missing[0]!r}, which the header does not have",
                                                 Location(str(self.path), 1, 1), hint=f"the columns: {', '.join(header)}")
                columns = list(header)
                self._count = sum(1 for _ in _rows(reader))
            else:
                columns, self._count = _jsonl_keys(f)
        self.ignored = {c for c in columns if c not in self.flow.inputs and c not in self._columns}
        if self._count:
            self._check_fed(columns)

    def _check_fed(self, columns: list[str]) -> None:
        fed = set(self.constants) | {name for name, column in self.mapping.items() if column in columns}
        fed |= {c for c in columns if c in self.flow.inputs and c not in self.mapping}
        unfed = [name for name, spec in self.flow.inputs.items() if spec.required and name not in fed]
        if not unfed:
            return
        what = "column" if self.format == "csv" else "key"
        listed = ", ".join(columns) or "none"
        raise FlowDefinitionError([Problem(
            f"input '{name}' is required, but no {what} of the inputs file feeds it and no -i gives it",
            Location(str(self.path), 1, 1),
            hint=f"the {what}s: {listed}; --map {name}={what.upper()} feeds it from a {what} of another name, "
                 f"-i {name}=VALUE gives every item the same value") for name in unfed])

    def count(self) -> int:
        """How many items the file holds (for the progress bar), as check() counted them."""
        if self._count is None:
            raise RuntimeError("ItemReader.count() before check(): check() is what counts the items")
        return self._count

    def __iter__(self) -> Iterator[Item]:
        with self._open() as f:
            if self.format == "csv":
                yield from self._csv(f)
            else:
                yield from self._jsonl(f)

    def _open(self) -> TextIO:
        from ..files import is_regular

        if self.path.exists() and not is_regular(self.path):  # /dev/zero would never end, a FIFO reads once
            raise FlowDefinitionError.at("--inputs: not a regular file (a batch reads its inputs more than once)",
                                         Location(str(self.path)), hint="save the inputs to a file first")
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
                row = json.loads(line, parse_int=read_int)
            except json.JSONDecodeError as e:
                yield self._bad(index, number, e.colno, f"invalid JSON: {e.msg}")
            except _UNREADABLE as e:
                yield self._bad(index, number, 1, _unreadable(e))
            else:
                if isinstance(row, dict):
                    yield self._item(index, number, row, from_text=False)
                else:
                    yield self._bad(index, number, 1, "expected a JSON object ({\"input\": value, ...}) on each line")
            index += 1

    def _csv_reader(self, f: TextIO) -> csv.DictReader[str]:
        dialect: Any = "excel-tab" if self.path.suffix.lower() == ".tsv" else "excel"
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        return csv.DictReader(f, dialect=dialect)

    def _csv(self, f: TextIO) -> Iterator[Item]:
        reader = self._csv_reader(f)
        header = reader.fieldnames or []
        for index, (line, row) in enumerate(_rows(reader)):
            if isinstance(row, csv.Error):
                yield self._bad(index, line, 1, f"not a CSV row: {row}")
            elif None in row or None in row.values():
                yield self._bad(index, line, 1, f"expected {len(header)} columns, as in the header")
            else:
                yield self._item(index, line, row, from_text=True)

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
        except _UNREADABLE as e:  # a value no input type can hold (e.g. a float() overflow): this row only
            return self._bad(index, line, 1, _unreadable(e), row)
        return Item(index, line, inputs)

    def _bad(self, index: int, line: int, col: int, message: str, row: Mapping[str, Any] | None = None) -> Item:
        if len(message) > 400:  # a reason that quotes a 200 KB cell: the start says enough
            message = message[:400] + "..."
        return Item(index, line, error=f"{Location(str(self.path), line, col)}: {message}", row=row)


def _rows(reader: csv.DictReader[str]) -> Iterator[tuple[int, dict[str, Any] | csv.Error]]:
    """(the line a row starts on, the row), or a csv.Error in its place: a row the csv module rejects
    is one bad item, and reading goes on after it."""
    line = reader.line_num + 1
    while True:
        try:
            row: dict[str, Any] | csv.Error = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            row = e
        yield line, row
        if isinstance(row, csv.Error) and reader.line_num < line:  # nothing read past the error: stop here
            return
        line = reader.line_num + 1


def _jsonl_keys(f: TextIO) -> tuple[list[str], int]:
    """The keys that any object line of a JSONL file has (its "columns"), in first-seen order, and the
    number of its items (lines that are not blank)."""
    keys: dict[str, None] = {}
    count = 0
    for line in f:
        if not line.strip():
            continue
        count += 1
        try:
            row = json.loads(line, parse_int=read_int)
        except _UNREADABLE:  # that item fails on its own when it runs
            continue
        if isinstance(row, dict):
            keys.update(dict.fromkeys(row))
    return list(keys), count


def _unreadable(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "a value nested too deeply to read"
    if isinstance(e, IntegerTooLong):
        return f"a number too long to read ({e})"
    return f"a value that cannot be read: {str(e)[:120]}"
