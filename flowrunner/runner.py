"""`flowrunner run`: load, take inputs, run with a sink, print the outcome."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED, FlowDefinitionError, Location
from .events import Event
from .files import echo
from .refs import to_text
from .report import print_error
from .sinks import Sink, open_sink


def parse_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    given: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise FlowDefinitionError.at(f"-i {pair!r}: expected NAME=VALUE", hint='for example -i question="What is RAG?"')
        given[name.strip()] = value
    return given


def load_inputs_file(path: Path) -> dict[str, Any]:
    from .flow.load import IntegerTooLong, parse_yaml, read_int, read_text

    text = read_text(path, "--inputs-file")
    if path.suffix.lower() == ".json":  # JSON proper: YAML rejects some valid JSON (surrogate-pair escapes)
        import json

        try:
            data = json.loads(text, parse_int=read_int)
        except json.JSONDecodeError as e:
            raise FlowDefinitionError.at(f"invalid JSON: {e.msg}", Location(str(path), e.lineno, e.colno)) from None
        except IntegerTooLong as e:
            raise FlowDefinitionError.at(f"invalid JSON: {e}", Location(str(path), 1, 1)) from None
        except RecursionError:
            raise FlowDefinitionError.at("invalid JSON: nested too deeply", Location(str(path), 1, 1)) from None
    else:
        data, _ = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise FlowDefinitionError.at("an inputs file must hold a mapping of input names to values", Location(str(path), 1, 1))
    return data


def llm_mode(dry_run: bool, record: Path | None, replay: Path | None) -> Any:
    """None (call the model), or a DryRun / Recorder / Replayer from flowrunner.llm.replay."""
    if sum((dry_run, record is not None, replay is not None)) > 1:
        raise FlowDefinitionError.at("--dry-run, --record and --replay exclude each other: choose one")
    if not (dry_run or record or replay):
        return None
    from .llm.replay import DryRun, Recorder, Replayer

    return DryRun() if dry_run else Recorder(record) if record else Replayer(replay)  # type: ignore[arg-type]


def run_once(flow_path: Path, pairs: tuple[str, ...], inputs_file: Path | None, connections_file: Path | None,
             sink_spec: str | None, output_format: str, obj: dict[str, Any], mode: Any = None,
             show_reasoning: bool = False) -> int:
    from . import logs
    from .engine import Run, check_connections
    from .flow.build import load_flow_with
    from .flow.inputs import resolve_inputs

    flow = load_flow_with(flow_path, connections_file)
    given: dict[str, Any] = load_inputs_file(inputs_file) if inputs_file else {}
    text_pairs = parse_pairs(pairs)
    given.update(text_pairs)
    inputs = resolve_inputs(flow, given, from_text=frozenset(text_pairs))
    # Ctrl-C / SIGTERM: the run_on_failure steps still save the turn the user saw (engine.STOP_GRACE).
    run = Run(flow, inputs, llm_mode=mode, grace_on_cancel=True)
    check_connections(flow, run.connections, llm_mode=mode)  # every unset ${env.X}: exit 2, before any file is opened
    if output_format == "json" and sink_spec is None:
        sink_spec = "none"
    sink = open_sink(sink_spec or "stdout")
    if output_format == "json" and sink.uses_stdout:
        sink.close()
        raise FlowDefinitionError.at(f"--sink {sink_spec} and --output json would both write to stdout",
                                     hint="send the events elsewhere, e.g. --sink jsonl:events.jsonl")
    if show_reasoning:
        from .sinks.reasoning import ReasoningView

        sink = ReasoningView(sink)
    logs.configure(obj.get("log_format"), obj.get("log_level"), errors_printed=True)

    stopped_by: int | None = None
    try:
        stopped_by = asyncio.run(_drive(run, sink))
    except KeyboardInterrupt:
        stopped_by = EXIT_INTERRUPTED
    finally:
        sink.close(interrupted=stopped_by is not None)
        if hasattr(mode, "close"):
            mode.close()
    if stopped_by is not None:
        for error in run.errors:  # e.g. a run_on_failure step that could not save the turn after the stop
            if error is not run.interruption:
                print_error(error, obj.get("debug", False))
        click.echo("Interrupted." if stopped_by == EXIT_INTERRUPTED else "Terminated.", err=True)
        return stopped_by
    if run.errors:
        for error in run.errors:
            print_error(error, obj.get("debug", False))
        return max(e.exit_code for e in run.errors)
    _print_outputs(run.outputs, sink, output_format)
    return 0


def cancel_on_sigterm() -> Callable[[], bool]:
    """SIGTERM (cron, systemd) stops the current task the way Ctrl-C does: it is cancelled, its streams
    closed, its run_on_failure steps run (bounded: engine.STOP_GRACE); a second one stops it at once.
    Returns a check: was it SIGTERM?"""
    task = asyncio.current_task()
    terminated = False

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
        pass
    return lambda: terminated


async def _drive(run: Any, sink: Sink) -> int | None:
    """Feed the run's events to the sink."""
    terminated = cancel_on_sigterm()
    try:
        event: Event
        async with aclosing(run.events()) as events:
            async for event in events:
                sink.handle(event)
    except asyncio.CancelledError:
        if terminated():
            return EXIT_TERMINATED
        raise
    return None


def _print_outputs(outputs: dict[str, Any], sink: Sink, output_format: str) -> None:
    if output_format == "json":
        echo(json.dumps(outputs, ensure_ascii=False, indent=2, default=str))
        return
    if sink.stdout_taken:
        return  # the answer already streamed to stdout, or stdout carries JSON events
    if len(outputs) == 1:
        echo(to_text(next(iter(outputs.values()))))
    else:
        for name, value in outputs.items():
            echo(f"{name}: {to_text(value)}")
