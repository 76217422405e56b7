"""`flowrunner validate`: check flow files offline, print every problem, exit 0 or 1. Warnings (a
step that may read a skipped step's null, flow/guards.py) are printed too, but leave the exit 0."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import FlowDefinitionError, FlowError, Location, Problem
from .files import echo

FLOW_SUFFIXES = (".yaml", ".yml")


def collect(paths: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in FLOW_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise FlowDefinitionError.at(f"no flow files (*.yaml, *.yml) in {path}", Location(str(path)))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise FlowDefinitionError.at("no such file or folder", Location(str(path)))
    return files


def validate_paths(paths: tuple[Path, ...], fmt: str, connections_file: Path | None) -> int:
    from .flow.build import load_connections_file, load_flow

    files = collect(paths)
    extra = load_connections_file(connections_file, "--connections") if connections_file else None
    results: list[tuple[Path, tuple[Problem, ...]]] = []
    warned: dict[Path, tuple[Problem, ...]] = {}
    for file in files:
        try:
            if _is_connections_file(file):  # kept beside the flows, for --connections
                load_connections_file(file)
            else:
                warned[file] = load_flow(file, extra).warnings
            results.append((file, ()))
        except FlowError as e:
            results.append((file, e.problems))
        except Exception as e:  # a bug in a check: say so for this file, and still check the others
            from . import secrets  # only here: its patterns cost start-up time

            what = f"{type(e).__name__}: {secrets.shorten(str(e), 200)}"  # masked, then cut
            results.append((file, (Problem(f"internal error while checking this file: {what}",
                                           Location(str(file), 1, 1),
                                           hint="please report it (flowrunner --debug validate FILE shows where)"),)))
            if _debug():
                raise
    bad = [r for r in results if r[1]]
    if fmt == "json":
        echo(json.dumps({
            "valid": not bad,
            "files": [{"file": str(f), "valid": not ps, "problems": [p.as_dict() for p in ps],
                       "warnings": [w.as_dict() for w in warned.get(f, ())]} for f, ps in results],
        }, indent=2))
    else:
        for file, problems in results:
            for p in problems:
                echo(_github(p, file) if fmt == "github" else "Error: " + p.format())
            for w in warned.get(file, ()):
                echo(_github(w, file, "warning") if fmt == "github" else "Warning: " + w.format())
        count = sum(len(ps) for _, ps in bad)
        summary = (f"{len(results)} file(s) valid" if not bad else
                   f"{len(bad)} of {len(results)} file(s) invalid, {count} problem(s)")
        warnings = sum(len(ws) for ws in warned.values())
        click.echo(summary + (f", {warnings} warning(s)" if warnings else ""), err=True)
    return 1 if bad else 0


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and isinstance(ctx.obj, dict) and ctx.obj.get("debug"))


def _is_connections_file(file: Path) -> bool:
    """A file with a top-level `connections:` and no `steps:` is a connections file, not a flow."""
    import re

    from .files import FLOW_LIMIT, is_regular, read_limited

    if not is_regular(file):  # a FIFO reads once (the loader reports it), /dev/zero never ends
        return False
    try:
        text = read_limited(file, FLOW_LIMIT).decode("utf-8", errors="replace")
    except FlowError:  # the loader says what is wrong with it
        return False
    keys = set(re.findall(r"^([A-Za-z_]+)\s*:", text, re.MULTILINE))
    return "connections" in keys and not keys & {"steps", "version", "name"}


def _escape(text: str, *, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def _github(p: Problem, file: Path, level: str = "error") -> str:
    """A GitHub Actions workflow command: the problem shows on the line in the pull request."""
    loc = p.location or Location(str(file))
    props = [f"file={_escape(loc.file, prop=True)}"]
    if loc.line:
        props += [f"line={loc.line}", f"col={loc.col or 1}"]
    props.append(f"title={_escape('flowrunner: ' + (p.path or 'flow'), prop=True)}")
    message = p.message + (f"\nhint: {p.hint}" if p.hint else "")
    return f"::{level} {','.join(props)}::{_escape(message)}"
