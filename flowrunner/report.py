"""The one error printer. Every command (run, chat, batch, the CLI's own top level) prints a user's
error through `print_error`, so errors look alike everywhere: `Error: file:line:col: path: message`
plus a hint, never a traceback unless --debug, never a secret.

It lives apart from cli.py so that the modules cli.py calls can print errors without importing it."""

from __future__ import annotations

import click

from . import console
from .errors import FlowError


def print_error(error: FlowError, debug: bool = False) -> None:
    from . import secrets

    console.end_answer_line()  # an answer cut short: the error starts on a line of its own
    if debug:
        import traceback

        click.echo(secrets.redact("".join(traceback.format_exception(error.__cause__ or error))), err=True)
    for problem in error.problems:
        click.echo("Error: " + secrets.redact(problem.format()), err=True)
