"""The command line: the Click group, its commands, and the last stop of every error (printed by
report.print_error, which the commands' own modules use too).

Imports stay lazy: `--help` and `validate` never import openai, asyncpg or pyodbc; `validate`'s
start-up is import time (bench/startup.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import EXIT_INTERRUPTED, FlowError, Problem
from .files import DEFAULT_MAX_BODY, echo, format_size, os_error
from .report import print_error


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Store a global option in the shared ctx.obj. Given before the command or after it, it counts:
    a command's own copy leaves the value unchanged when not given (it cannot undo the group's)."""
    obj = ctx.ensure_object(dict)
    if value or param.name not in obj:
        obj[param.name] = value
    debug, verbose, quiet = (obj.get(name, False) for name in ("debug", "verbose", "quiet"))
    obj["log_level"] = "debug" if debug else "info" if verbose else "error" if quiet else None
    return value


def _global_options() -> list[click.Option]:
    """The options of the whole program, accepted before the command and after it, so that
    `flowrunner run flow.yaml --debug` works and each command's --help lists them."""
    common: dict[str, Any] = {"expose_value": False, "callback": _set_global}
    return [
        click.Option(["--debug"], is_flag=True, help="Show tracebacks and debug logs.", **common),
        click.Option(["--log-format"], type=click.Choice(["console", "json"]), default=None,
                     help="Log lines on stderr (default: console on a terminal, json otherwise).", **common),
        click.Option(["-v", "--verbose"], is_flag=True, help="Log each step (info level).", **common),
        click.Option(["-q", "--quiet"], is_flag=True, help="Log errors only.", **common),
    ]


class _Command(click.Command):
    """A command that takes the global options too, after its own. They are made when the command
    is parsed or its help shown, so only the command that runs pays for them."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not any(param.name == "debug" for param in self.params):
            self.params.extend(_global_options())
        return super().get_params(ctx)


class _Group(click.Group):
    """An OSError that no command caught (a socket that broke: stdout's own failures are FlowErrors
    already, see files.echo) becomes a FlowError here, before click's own handler would make any
    EPIPE a silent exit 1. Its commands are _Commands, its groups (`db`) _Groups."""

    command_class = _Command
    group_class = type

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            raise os_error(e) from e  # --debug shows the OSError's traceback


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             params=_global_options())
@click.version_option(__version__, prog_name="flowrunner")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run declarative YAML flows for LLM chat backends.

    \b
    flowrunner run flows/hello.yaml -i name=Ada
    flowrunner validate flows/
    flowrunner steps set
    """
    ctx.ensure_object(dict)


class _FlowFile(click.Path):
    """A command's FLOW argument: one flow file. A folder gets a better answer than click's "is a
    directory": `validate` is the command that takes folders."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        if Path(path).is_dir():
            command = ctx.command_path if ctx else "flowrunner"
            self.fail(f"{click.format_filename(value)!r} is a folder: {command} takes one flow file "
                      f"(flowrunner validate {click.format_filename(value)} checks every flow in a folder)",
                      param, ctx)
        return path


# One instance of each path type, shared: click translates a path type's name with gettext when it
# is made, which searches the disk for translation catalogues each time (a third of this module's
# import time with a type per option).
_FLOW = _FlowFile()
_FILE = click.Path(dir_okay=False, path_type=Path)
_FOLDER = click.Path(file_okay=False, path_type=Path)
_CONNECTIONS = click.option("--connections", "connections_file", type=_FILE,
                            help="Connections from a separate YAML file (they override the flow's own).")
_SHOW_REASONING = click.option("--show-reasoning", is_flag=True,
                               help="Show a reasoning model's thinking on stderr as it arrives (dimmed on a "
                                    "terminal); the answer alone goes to stdout.")


@cli.command()
@click.argument("flow", type=_FLOW)
@click.option("-i", "--input", "pairs", multiple=True, metavar="NAME=VALUE",
              help="A flow input; coerced to its declared type. Repeat for more.")
@click.option("--inputs-file", type=_FILE,
              help="Inputs from a JSON or YAML mapping (-i values override it).")
@_CONNECTIONS
@click.option("--sink", default=None, metavar="SINK",
              help="stdout (default), none, jsonl:PATH, jsonl:- or file:PATH.")
@click.option("--output", "output_format", type=click.Choice(["text", "json"]), default="text",
              help="json: print the flow's outputs as one JSON object at the end.")
@click.option("--dry-run", is_flag=True,
              help="Run every step but the chat model call; print the exact request each chat step would send.")
@click.option("--record", type=_FILE, metavar="FILE",
              help="Save the model's streamed replies (and embeddings) to FILE, for --replay.")
@click.option("--replay", type=_FILE, metavar="FILE",
              help="Play the replies recorded in FILE instead of calling the model (offline, deterministic).")
@_SHOW_REASONING
@click.pass_obj
def run(obj: dict[str, Any], flow: Path, pairs: tuple[str, ...], inputs_file: Path | None,
        connections_file: Path | None, sink: str | None, output_format: str, dry_run: bool,
        record: Path | None, replay: Path | None, show_reasoning: bool) -> int:
    """Run FLOW once; the streamed text goes to stdout as it arrives, logs to stderr."""
    from .runner import llm_mode, run_once

    mode = llm_mode(dry_run, record, replay)
    return run_once(flow, pairs, inputs_file, connections_file, sink, output_format, obj, mode,
                    show_reasoning=show_reasoning)


@cli.command()
@click.argument("flow", type=_FLOW)
@click.option("--inputs", "inputs_path", required=True, type=_FILE,
              help="JSONL (one object per line) or CSV (a header row): one flow run per line or row.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="The inputs file's format (default: from its extension; .csv/.tsv are CSV).")
@click.option("--map", "maps", multiple=True, metavar="INPUT=COLUMN",
              help="Feed a flow input from a column (or JSON key) of another name. Repeat for more.")
@click.option("-i", "--input", "pairs", multiple=True, metavar="NAME=VALUE",
              help="An input with the same value for every item (a row's own value wins).")
@click.option("--output", type=_FILE,
              help="Results file, one JSON line per item (default: stdout).")
@click.option("--concurrency", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Items run at the same time.")
@click.option("--rate-limit", "rate_limits", multiple=True, metavar="N rpm|N tpm",
              help="Stay under the provider's limits: model requests and/or tokens per minute, e.g. 500rpm,200000tpm.")
@click.option("--resume", is_flag=True, help="Keep the items already ok in --output; run the rest (and the failed).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first item that fails (default: keep going, exit 1).")
@_CONNECTIONS
@click.pass_obj
def batch(obj: dict[str, Any], flow: Path, inputs_path: Path, fmt: str | None, maps: tuple[str, ...],
          pairs: tuple[str, ...], output: Path | None, concurrency: int, rate_limits: tuple[str, ...], resume: bool,
          fail_fast: bool, connections_file: Path | None) -> int:
    """Run FLOW once per line of a JSONL file or row of a CSV file; results appended as items finish."""
    from .batch.command import run_batch

    return run_batch(flow, inputs_path, fmt, maps, pairs, output, concurrency, rate_limits, resume, fail_fast,
                     connections_file, obj)


_MESSAGE_INPUT = click.option("--message-input", metavar="NAME",
                              help="The flow input that takes the user's message (default: question, message, "
                                   "prompt, query or input, or the one required string input).")


def _body_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    from .serve.limits import parse_size  # only when serving: the other commands never import serve

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _cors_origins(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        return values
    from .serve.cors import check_origin

    try:
        return tuple(dict.fromkeys(check_origin(v) for v in values))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _rpm(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from .serve.admission import parse_rpm

    try:
        return parse_rpm(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _workers(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    if value == "1":
        return 1
    from .serve.workers import worker_count

    try:
        return worker_count(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@click.argument("flow", type=_FLOW)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="FLOWRUNNER_API_KEY", multiple=True,
              help="Require this bearer key from clients; repeat it to give each client its own (default: "
                   "$FLOWRUNNER_API_KEY, keys separated by commas; none: open).")
@click.option("--keepalive", type=click.FloatRange(min=0.1), default=15.0, show_default=True,
              help="Seconds of silence before a keep-alive comment on a stream.")
@click.option("--max-body-size", default=format_size(DEFAULT_MAX_BODY), show_default=True, metavar="SIZE",
              callback=_body_size,
              help="Largest request body accepted (bytes, or e.g. 512KiB, 16MiB); a larger one is a 413.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN", callback=_cors_origins,
              help="Let web pages of this origin (e.g. https://app.example.com, or *) call serve; repeatable.")
@click.option("--max-concurrent-streams", "max_streams", type=click.IntRange(min=1), metavar="N",
              help="Runs in flight at once (streamed or not), in each worker; beyond it a 429 with Retry-After.")
@click.option("--max-streams-per-key", "per_key_streams", type=click.IntRange(min=1), metavar="N",
              help="Runs in flight at once for each --api-key, in each worker; beyond it a 429.")
@click.option("--rate-limit-per-key", "per_key_rpm", metavar="Nrpm", callback=_rpm,
              help="Requests per minute for each --api-key, in each worker, e.g. 60rpm; beyond it a 429 with "
                   "Retry-After.")
@click.option("--grace", type=click.FloatRange(min=0), default=25.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM, how long the streams in flight may go on before they are stopped.")
@click.option("--workers", default="1", show_default=True, metavar="N|auto", callback=_workers,
              help="Processes answering on the port, each with its own connections (auto: one per CPU).")
@_MESSAGE_INPUT
@_CONNECTIONS
@click.pass_obj
def serve(obj: dict[str, Any], flow: Path, host: str, port: int, api_key: tuple[str, ...], keepalive: float,
          max_body_size: int, cors_origins: tuple[str, ...], max_streams: int | None, per_key_streams: int | None,
          per_key_rpm: int | None, grace: float, workers: int, message_input: str | None,
          connections_file: Path | None) -> int:
    """Serve FLOW as an OpenAI-compatible /v1/chat/completions and /v1/responses (streaming or not)."""
    from .serve.command import serve as run_server

    return run_server(flow, host, port, connections_file, message_input, api_key, keepalive, obj,
                      max_body_size=max_body_size, grace=grace, cors_origins=cors_origins, max_streams=max_streams,
                      per_key_streams=per_key_streams, per_key_rpm=per_key_rpm, workers=workers)


@cli.command()
@click.argument("flow", type=_FLOW)
@click.option("--conversation", "conversation_id", metavar="ID",
              help="Continue this conversation (default: a new one; its id is printed).")
@click.option("-i", "--input", "pairs", multiple=True, metavar="NAME=VALUE",
              help="Another flow input, the same for every message (e.g. -i model=gpt-4o).")
@_MESSAGE_INPUT
@_CONNECTIONS
@_SHOW_REASONING
@click.pass_obj
def chat(obj: dict[str, Any], flow: Path, conversation_id: str | None, pairs: tuple[str, ...],
         message_input: str | None, connections_file: Path | None, show_reasoning: bool) -> int:
    """Talk to FLOW in the terminal: answers stream in; Ctrl-C stops an answer, Ctrl-D exits
    (exit 1 if any answer failed)."""
    from .chat import chat_loop
    from .runner import parse_pairs

    return chat_loop(flow, conversation_id, parse_pairs(pairs), message_input, connections_file,
                     {**obj, "show_reasoning": show_reasoning})


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json", "github"]), default="text",
              help="github: GitHub Actions annotations.")
@click.option("--connections", "connections_file", type=_FILE,
              help="Connections the flows may use, from a separate YAML file.")
def validate(paths: tuple[Path, ...], fmt: str, connections_file: Path | None) -> int:
    """Check flow files (and folders of them) offline; exit 1 if any is invalid."""
    from .validate import validate_paths

    return validate_paths(paths, fmt, connections_file)


@cli.command()
def schema() -> int:
    """Print the JSON Schema of flow files (also in schemas/flow.schema.json)."""
    from .flow.schema import schema_text

    echo(schema_text(), nl=False)
    return 0


@cli.command()
@click.argument("type_name", required=False, metavar="[TYPE]")
@click.option("--markdown", "markdown_dir", type=_FOLDER, metavar="DIR",
              help="Write a reference page per step type (and an index) into DIR.")
def steps(type_name: str | None, markdown_dir: Path | None) -> int:
    """List the step types, or describe one."""
    from .docs import describe_step, list_steps, markdown_index, markdown_step
    from .steps import STEP_TYPES

    if markdown_dir is not None:
        markdown_dir.mkdir(parents=True, exist_ok=True)
        for name in [type_name] if type_name else sorted(STEP_TYPES):
            (markdown_dir / f"{name}.md").write_text(markdown_step(name), encoding="utf-8")
        if not type_name:
            (markdown_dir / "README.md").write_text(markdown_index(), encoding="utf-8")
        echo(f"wrote the step reference into {markdown_dir}")
        return 0
    echo(describe_step(type_name) if type_name else list_steps(), nl=False)
    return 0


@cli.group()
def db() -> None:
    """Databases: the history tables, and the embedded PostgreSQL (postgres connections without a dsn)."""


@db.command("init")
@click.argument("flow", type=_FLOW)
@_CONNECTIONS
def db_init(flow: Path, connections_file: Path | None) -> int:
    """Create the chat-history tables FLOW's history steps use (safe to repeat)."""
    from .history.init import init_tables

    return init_tables(flow, connections_file)


_DATA_DIR = click.option("--data-dir", type=_FOLDER,
                         help="Its data directory (default: the user's data directory, or $FLOWRUNNER_DATA_DIR).")


@db.command("status")
@_DATA_DIR
def db_status(data_dir: Path | None) -> int:
    """Say whether the embedded PostgreSQL is running."""
    from .connections import embedded_pg

    directory = embedded_pg.data_dir(data_dir)
    pid = embedded_pg.status(directory)
    echo(f"running (pid {pid}) in {directory}" if pid else f"not running ({directory})")
    return 0


@db.command("stop")
@_DATA_DIR
def db_stop(data_dir: Path | None) -> int:
    """Stop the embedded PostgreSQL (its data stays; the next run starts it again)."""
    from .connections import embedded_pg

    directory = embedded_pg.data_dir(data_dir)
    stopped = embedded_pg.stop(directory)
    echo(f"stopped the embedded PostgreSQL in {directory}" if stopped else f"not running ({directory})")
    return 0


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rc = cli.main(args=argv, prog_name="flowrunner", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted.", err=True)
        rc = EXIT_INTERRUPTED
    except click.ClickException as e:
        e.show()
        rc = e.exit_code
    except FlowError as e:
        print_error(e, debug)
        rc = e.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        rc = EXIT_INTERRUPTED
    except OSError as e:  # one no command made a FlowError (stdout's are, through files.echo and the sinks)
        error = os_error(e)
        print_error(error, debug)
        rc = error.exit_code
    except Exception as e:  # a bug: say so plainly, and keep the traceback for --debug
        print_error(FlowError(Problem(f"internal error: {type(e).__name__}: {e}",
                                      hint="run with --debug for the traceback, and please report it")), debug)
        if debug:
            raise
        rc = 1
    sys.exit(rc if isinstance(rc, int) else 0)


__all__ = ["cli", "main"]
