"""YAML text -> plain data plus a source map from every value's path to file:line:col.

Only safe YAML: the standard JSON-like tags, no object construction, no duplicate keys, and a
budget on alias expansion so an anchor/alias bomb is refused instead of eating memory. Booleans
are YAML 1.2's `true`/`false` only, and dates stay strings, so `default: no` means the text "no".
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import FlowDefinitionError, Location, Problem
from ..files import FLOW_LIMIT, read_limited

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

PathKey = tuple[str | int, ...]
_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # the line breaks YAML counts
MAX_NODES = 100_000  # more nodes than any real flow; alias bombs go far past it
# The limits of every value a user gives (flows, inputs, inputs files, batch items); serve has its
# own for request bodies (serve/openai_api.py says why). Deeper than any real flow, and shallow
# enough that every recursive walk of the data (references, the schema, JSON) stays far from
# Python's recursion limit.
MAX_DEPTH = 100
MAX_INT_DIGITS = 4300  # Python refuses to read longer decimal integers (sys.get_int_max_str_digits)


class IntegerTooLong(ValueError):
    """A JSON integer of more than MAX_INT_DIGITS digits (json.loads(..., parse_int=read_int))."""


def read_int(text: str) -> int:
    """json.loads' parse_int: a longer integer than MAX_INT_DIGITS is IntegerTooLong, an error of its
    own type, instead of the ValueError int() raises for it (which json.loads raises for much else)."""
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise IntegerTooLong(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


_STR = "tag:yaml.org,2002:str"
_ALLOWED_TAGS = {
    _STR,
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:merge",
}


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


# Rebuild the implicit resolvers without YAML 1.1's yes/no/on/off booleans and without timestamps.
for _first, _resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items():
    _kept = [
        (tag, rx)
        for tag, rx in _resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    if _kept:
        _Loader.yaml_implicit_resolvers[_first] = _kept
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a flow file starts."""

    file: str
    text: str
    values: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    ends: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # where each value ends
    _starts: list[int] | None = field(default=None, repr=False, compare=False)

    def location(self, path: PathKey, *, key: bool = False) -> Location:
        """The closest known position of `path` (walking up to a parent when needed)."""
        table = self.keys if key else self.values
        probe = tuple(path)
        if probe in table:
            line, col = table[probe]
            return Location(self.file, line, col)
        while probe:
            probe = probe[:-1]
            if probe in self.values:
                line, col = self.values[probe]
                return Location(self.file, line, col)
        return Location(self.file, 1, 1)

    def find_in_value(self, path: PathKey, needle: str, occurrence: int = 0) -> Location:
        """The position of `needle` (e.g. one ${...} reference) inside the scalar at `path`.

        Block and quoted scalars do not map offsets to columns simply, so search the source text
        from where the scalar starts."""
        start = self.values.get(tuple(path))
        if start is None:
            return self.location(path)
        index = self._offset(*start)
        # Search only inside the scalar: a file with thousands of problems stays linear, and a
        # needle written differently in the source (an escape) never lands on some later value.
        end = self._offset(*self.ends[tuple(path)]) if tuple(path) in self.ends else len(self.text)
        for _ in range(occurrence + 1):
            found = self.text.find(needle, index, end)
            if found < 0:
                return self.location(path)
            index = found + 1
        starts = self._line_starts()
        line = bisect.bisect_right(starts, found)
        return Location(self.file, line, found - starts[line - 1] + 1)

    def _line_starts(self) -> list[int]:
        """Offsets where each line begins, by YAML's line breaks; computed once per file."""
        if self._starts is None:
            self._starts = [0, *(m.end() for m in _BREAK.finditer(self.text))]
        return self._starts

    def _offset(self, line: int, col: int) -> int:
        starts = self._line_starts()
        return starts[min(max(line, 1), len(starts)) - 1] + col - 1


def format_path(path: PathKey) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def read_text(file: str | Path, option: str = "") -> str:
    """The text of a flow, connections or inputs file. `option`: the command-line option that named
    it (e.g. "--connections"), which its errors then name."""
    name = str(file)
    # At most FLOW_LIMIT bytes are read: `/dev/zero` or a FIFO given as a flow is an error, not a hang.
    raw = read_limited(file, FLOW_LIMIT, option,
                       missing_hint=None if option else "check the path (flowrunner validate DIR finds *.yaml files)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise FlowDefinitionError.at(
            "the file is not valid UTF-8", Location(name, line, 1), hint="save it as UTF-8"
        ) from None


def parse_yaml(text: str, file: str = "<string>") -> tuple[Any, SourceMap]:
    """Parse one YAML document into plain data and its source map, or raise FlowDefinitionError."""
    smap = SourceMap(file, text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise FlowDefinitionError.at(
                "the file is empty",
                Location(file, 1, 1),
                hint="a flow needs at least `version: 1`, `name:` and `steps:`",
            )
        problems: list[Problem] = []
        _check(node, (), smap, problems, [0])
        if problems:
            raise FlowDefinitionError(problems)
        data = loader.construct_document(node)
        _record(node, data, (), smap)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        message = " ".join(str(x) for x in (e.context, e.problem) if x) or "invalid YAML"
        at_tab = mark is not None and text[mark.index : mark.index + 1] == "\t"
        line_text = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = ("indent with spaces, not tabs" if at_tab
                else 'inside [...] or {...}, quote values that hold a reference: "${x}"'
                if "${" in line_text and ("flow" in message or "','" in message)
                else _yaml_hint(message))
        raise FlowDefinitionError.at(f"invalid YAML: {message}", where, hint=hint) from None
    except yaml.reader.ReaderError as e:  # control characters and the like carry no mark
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise FlowDefinitionError.at(f"invalid YAML: {e.reason} (U+{code:04X})", Location(file, line, col),
                                     hint="remove the control character") from None
    except yaml.YAMLError as e:
        raise FlowDefinitionError.at(f"invalid YAML: {e}", Location(file, 1, 1)) from None
    except RecursionError:
        raise FlowDefinitionError.at("the YAML is nested too deeply", Location(file, 1, 1)) from None
    finally:
        loader.dispose()
    return data, smap


def _yaml_hint(message: str) -> str | None:
    if "mapping values are not allowed" in message:
        return "quote a value that contains ': ' (for example \"Note: read this\")"
    if "could not find expected ':'" in message or "simple key" in message:
        return "check the indentation and that each key ends with ':'"
    if "found character '@'" in message or "found character '`'" in message:
        return "quote a value that starts with @ or `"
    if "expected a single document" in message:
        return "a flow file holds one YAML document (remove the extra '---')"
    return None


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text.replace("_", "")))
    except ValueError:  # YAML 1.1's sexagesimal floats (1:30.5): PyYAML reads them, and they are finite
        return not text.lower().lstrip("+-").startswith((".nan", ".inf"))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _check(node: yaml.Node, path: PathKey, smap: SourceMap, problems: list[Problem], budget: list[int]) -> None:
    """Before construction: refuse custom tags, non-string and duplicate keys, and alias bombs."""
    budget[0] += 1
    if budget[0] > MAX_NODES:
        raise FlowDefinitionError.at(
            "the YAML expands to too many values (an anchor/alias bomb, or a recursive alias)",
            Location(smap.file, *_mark(node)),
            hint="flow files may use anchors and aliases, but not to build huge or recursive values",
        )
    if node.tag not in _ALLOWED_TAGS:
        problems.append(
            Problem(f"the YAML tag '{node.tag.replace('tag:yaml.org,2002:', '!!')}' is not allowed",
                    Location(smap.file, *_mark(node)), format_path(path),
                    hint="flow files use plain YAML values: strings, numbers, booleans, lists and maps")
        )
        return
    if len(path) > MAX_DEPTH:
        problems.append(Problem(f"the YAML is nested more than {MAX_DEPTH} levels deep", Location(smap.file, *_mark(node)),
                                format_path(path[:8]) + "...",
                                hint="flatten the value; no flow needs this depth"))
        return
    if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_INT_DIGITS:  # hex and octal too
        problems.append(Problem(f"the integer has more than {MAX_INT_DIGITS} digits", Location(smap.file, *_mark(node)),
                                format_path(path),
                                hint="quote it if it is meant as text"))
        return
    if node.tag == "tag:yaml.org,2002:float" and not _finite(node.value):  # .nan, .inf, 1e999: no JSON number
        problems.append(Problem(f"{node.value} is not a finite number (JSON has no NaN or infinity)",
                                Location(smap.file, *_mark(node)), format_path(path),
                                hint="write a finite number, or quote it if it is meant as text"))
        return
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check(item, (*path, i), smap, problems, budget)
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                _check(value, path, smap, problems, budget)
                continue
            if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
                kwhere = Location(smap.file, *_mark(key))  # built for a problem only: most nodes have none
                shown = key.value if isinstance(key, yaml.ScalarNode) else "a collection"
                problems.append(
                    Problem(f"mapping key {shown!r} is not a string", kwhere, format_path(path),
                            hint=f'quote the key: "{shown}":' if isinstance(key, yaml.ScalarNode) else None)
                )
                continue
            if key.value in seen:
                problems.append(
                    Problem(f"duplicate key '{key.value}'", Location(smap.file, *_mark(key)), format_path((*path, key.value)),
                            hint="each key may appear once in a mapping; remove or rename one")
                )
            seen.add(key.value)
            _check(value, (*path, key.value), smap, problems, budget)


def _record(node: yaml.Node, data: Any, path: PathKey, smap: SourceMap) -> None:
    """After construction (merge keys resolved): the position of every value and key."""
    smap.values.setdefault(path, _mark(node))
    smap.ends.setdefault(path, (node.end_mark.line + 1, node.end_mark.column + 1))
    if isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for i, item in enumerate(node.value):
            if i < len(data):
                _record(item, data[i], (*path, i), smap)
    elif isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        # After flatten_mapping, merged pairs come first and a mapping's own keys override them:
        # walk in reverse so the winning key's position is recorded.
        for key, value in reversed(node.value):
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name in data and (*path, name) not in smap.keys:
                smap.keys[(*path, name)] = _mark(key)
                _record(value, data[name], (*path, name), smap)
