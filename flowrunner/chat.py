"""`flowrunner chat FLOW`: a conversation in the terminal. One event loop and one set of connections
for the whole session; each line is a run whose answer streams to stdout. Ctrl-C stops the answer
(its model stream is closed) and the conversation goes on; Ctrl-D or /exit ends it."""

from __future__ import annotations

import asyncio
import sys
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_FAILED, EXIT_OK
from .report import print_error


def chat_loop(flow_path: Path, conversation_id: str | None, extra: dict[str, str], message_input: str | None,
              connections_file: Path | None, obj: dict[str, Any]) -> int:
    from . import logs
    from .connections.pool import Connections
    from .conversation import ChatInputs
    from .flow.build import load_flow_with

    flow = load_flow_with(flow_path, connections_file)
    chat = ChatInputs.of(flow, message_input)
    conversation = conversation_id or f"chat-{uuid.uuid4().hex[:12]}"
    logs.configure(obj.get("log_format"), obj.get("log_level"), quiet_runs=obj.get("log_level") is None,
                   errors_printed=True)
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401 - line editing and history for input()

        where = (f"conversation {conversation} (continue it later with --conversation {conversation})"
                 if chat.keeps_history else "this conversation lives as long as the session")
        click.echo(f"{flow.name}: {where}. Ctrl-C stops an answer, Ctrl-D exits.", err=True)
    first = chat.turn("check", conversation_id=conversation, extra=extra, extra_is_text=True)  # wrong inputs: exit 2 now
    earlier: list[dict[str, Any]] = []  # the turns so far, for flows that keep no history of their own
    failed = False
    with asyncio.Runner() as runner:
        connections = Connections(flow)
        from .engine import check_connections

        check_connections(flow, connections, client_history=first[1])  # an unset ${env.X}: exit 2 now
        try:
            while True:
                try:
                    text = input("you> " if tty else "")
                except EOFError:
                    break
                except KeyboardInterrupt:  # at the prompt: a fresh line, like Python's own REPL
                    click.echo("", err=True)
                    continue
                if text.strip() in ("/exit", "/quit"):
                    break
                if not text.strip():
                    continue
                try:
                    answer = runner.run(_turn(chat, connections, text, conversation, earlier, extra, obj))
                except KeyboardInterrupt:  # the run was cancelled, its stream closed: on to the next line
                    click.echo("\n(stopped)", err=True)
                    continue
                failed = failed or answer is None
                if answer is not None:
                    earlier += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        finally:
            runner.run(connections.__aexit__(None, None, None))
    if tty:
        click.echo("", err=True)
    return EXIT_FAILED if failed else EXIT_OK


async def _turn(chat: Any, connections: Any, text: str, conversation: str, earlier: list[dict[str, Any]],
                extra: dict[str, str], obj: dict[str, Any]) -> str | None:
    """Runs the flow for one message; streams the answer; returns it, or None when the run failed."""
    from .engine import Run
    from .sinks.reasoning import show_reasoning
    from .sinks.stdout import StdoutSink

    inputs, client_history = chat.turn(text, conversation_id=conversation, earlier=earlier, extra=extra,
                                       extra_is_text=True)
    # Ctrl-C stops the answer; the run_on_failure steps still save the turn the user saw.
    run = Run(chat.flow, inputs, connections=connections, client_history=client_history, grace_on_cancel=True)
    sink = show_reasoning(StdoutSink(), obj.get("show_reasoning", False))
    parts: list[str] = []
    async with aclosing(run.events()) as events:
        async for event in events:
            sink.handle(event)
            if event.kind == "text":
                parts.append(event.text)  # type: ignore[attr-defined]
    if not parts and run.outputs:  # a flow without a chat step: its outputs are the answer
        from .conversation import outputs_as_answer
        from .events import TextDelta

        parts.append(outputs_as_answer(run.outputs))
        sink.handle(TextDelta("outputs", parts[0]))
    sink.close()
    for error in run.errors:
        print_error(error, obj.get("debug", False))
    return None if run.errors else "".join(parts)
