"""The schema files that `output_schema: {file: PATH}` names: confined to the flow file's folder (a
served flow must not read what else is on the disk), read with the flows' size limit, and cached by
path and modification time, so `validate`, the reference checks and every run read each once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FlowDefinitionError, Location
from ..files import confined
from ..flow.load import SourceMap

_FILES: dict[tuple[str, int, int], tuple[Any, SourceMap]] = {}


def flow_folder(flow_file: str) -> Path:
    return Path(flow_file).parent


def schema_path(flow_file: str, name: str) -> Path:
    """The schema file `name` (relative to the flow file's folder), or FlowDefinitionError when it
    lies outside that folder (symlinks resolved)."""
    base = flow_folder(flow_file).resolve()
    path = confined(base, name)
    if path is not None:
        return path
    if confined(Path("/"), name) is None:  # not even a usable name: a NUL, a symlink loop, an unknown ~user
        raise FlowDefinitionError.at("not a usable file name",
                                     hint="name a JSON or YAML file beside the flow, e.g. schemas/answer.json")
    raise FlowDefinitionError.at("lies outside the flow file's folder",
                                 hint="keep the schema beside the flow, or in a folder below it")


def shown_name(flow_file: str, name: str) -> str:
    """The schema file as its errors name it: beside the flow file, as the flow file was named."""
    return str(flow_folder(flow_file) / name)


def read_schema_file(path: Path, shown: str) -> tuple[Any, SourceMap]:
    """A schema file's data and source map (JSON, or YAML), or FlowDefinitionError located in it."""
    from ..files import FLOW_LIMIT, read_limited
    from ..flow.load import parse_yaml

    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key is not None and key in _FILES:
        return _FILES[key]
    raw = read_limited(path, FLOW_LIMIT, "",
                       missing_hint="output_schema: {file: ...} is relative to the flow file's folder")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FlowDefinitionError.at("the schema file is not valid UTF-8",
                                     Location(shown, raw.count(b"\n", 0, e.start) + 1, 1)) from None
    if path.suffix.lower() == ".json":
        try:  # exact JSON errors first: YAML reads some invalid JSON (a trailing comma) without a word
            json.loads(text)
        except json.JSONDecodeError as e:
            raise FlowDefinitionError.at(f"the schema file is not valid JSON: {e.msg}",
                                         Location(shown, e.lineno, e.colno)) from None
        except (RecursionError, ValueError):
            raise FlowDefinitionError.at("the schema file is nested too deeply or holds a number too long",
                                         Location(shown, 1, 1)) from None
    data, smap = parse_yaml(text, shown)  # the same data as JSON, plus where each value is
    if key is not None:
        _FILES[key] = (data, smap)
    return data, smap
