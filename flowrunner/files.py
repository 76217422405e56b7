"""The files a user names, read with a size limit; and failed writes (a full disk, a closed stdout) as
errors with an exit code, never "internal error".

Reading: a flow, a connections file, an inputs file or a recording is read whole, and at most `limit`
bytes of it: `/dev/zero` or a huge file is an error at the limit instead of eating memory. A FIFO or a
character device is read the same way (`--inputs-file <(...)` works); it is opened without blocking,
so a FIFO that no process writes to reads as empty instead of hanging. Exit 2: the file argument is
wrong, nothing ran.

Writing: a sink, `--record` or `batch --output` that cannot write fails the run with exit 1 and
names what it was writing (`write_error`). A closed stdout (`| head -c1`) is not an error worth a
message: the command stops quietly with 141, as a program killed by SIGPIPE would (`stdout_failed`).
Only a write to stdout is told apart that way: a command prints through `echo`, the sinks and batch
results call `stdout_failed` themselves; any other OSError (a database's socket that broke) is an
error with its type and message (`os_error`).

Sizes: the byte units and `format_size`, for every limit a message names (files, serve's bodies)."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

from .errors import EXIT_BROKEN_PIPE, FlowDefinitionError, FlowError, FlowRuntimeError, Location, Problem

KIB, MIB, GIB = 1024, 1024**2, 1024**3
FLOW_LIMIT = 10 * MIB  # flows, connections files and inputs files: far above any real one
RECORDING_LIMIT = 128 * MIB  # --replay: recordings hold embedding vectors (~30 KB a call), and grow with the flow
# serve --max-body-size; here (not in serve.limits) so that the CLI shows it without importing serve.
DEFAULT_MAX_BODY = 4 * MIB
_CHUNK = 1 << 16


def read_limited(path: str | Path, limit: int = FLOW_LIMIT, what: str = "", missing_hint: str | None = None) -> bytes:
    """The bytes of `path`, or FlowDefinitionError (exit 2) naming it: missing, a folder, unreadable,
    or larger than `limit`. `what` (e.g. "--replay") starts each message."""
    name = str(path)
    head = f"{what}: " if what else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FlowDefinitionError.at(f"{head}no such file", Location(name), hint=missing_hint) from None
    except OSError as e:
        raise FlowDefinitionError.at(f"{head}cannot read the file: {e.strerror or e}", Location(name)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FlowDefinitionError.at(f"{head}is a folder, not a file", Location(name))
        if not stat.S_ISREG(mode):
            # A FIFO or a device: block on reads from now on (a writer may be slow), but the open above
            # did not wait for a writer that may never come.
            os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise FlowDefinitionError.at(f"{head}the file is larger than {format_size(limit)}", Location(name),
                                     hint="is it the right file?" if stat.S_ISREG(mode)
                                     else "a device or a pipe is read up to this limit")
    except OSError as e:
        raise FlowDefinitionError.at(f"{head}cannot read the file: {e.strerror or e}", Location(name)) from None
    finally:
        os.close(fd)


def is_regular(path: str | Path) -> bool:
    """A plain file (following symlinks): something that can be read twice, and ends."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def confined(base: Path, name: str) -> Path | None:
    """`name`, relative to the folder `base` (resolved), with symlinks resolved; None when it lies
    outside `base` or is no usable name (a NUL, a symlink loop, an unknown ~user). What a flow may
    read beside itself: its images, its schema files."""
    try:
        path = (base / Path(name).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path.is_relative_to(base) else None


def write_error(e: OSError, where: str) -> FlowRuntimeError:
    """A write that failed at run time (exit 1), naming what was being written: `where` is e.g.
    "stdout", "the events file ev.jsonl", "the results file out.jsonl"."""
    hint = {errno.ENOSPC: "the disk is full: free some space, or write elsewhere",
            errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere",
            errno.EPIPE: "the program reading it went away",
            errno.EROFS: "the file system is read-only: write elsewhere"}.get(e.errno or 0)
    return FlowRuntimeError(Problem(f"cannot write {where}: {e.strerror or e}", hint=hint))


class OutputClosed(FlowError):
    """stdout's reader went away (`| head`): stop quietly (no message: there is no one to tell) with
    141, what a shell shows for a program that SIGPIPE stopped."""

    exit_code = EXIT_BROKEN_PIPE

    def __init__(self) -> None:
        super().__init__(())


def discard_stdout() -> None:
    """Point stdout at /dev/null once writing to it failed, so that flushing what is left at exit does
    not fail again (Python would print `Exception ignored ... BrokenPipeError` and exit 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (closed, or a test's StringIO)
        pass


def stdout_failed(e: OSError) -> FlowError:
    """Writing to stdout failed: a closed pipe stops quietly (OutputClosed), anything else (a full
    disk) is a write error. Either way stdout is discarded from now on."""
    discard_stdout()
    if isinstance(e, BrokenPipeError) or e.errno == errno.EPIPE:
        return OutputClosed()
    return write_error(e, "stdout")


def echo(text: str = "", nl: bool = True) -> None:
    """Print a command's outputs or report to stdout; a failed write is stdout's (`stdout_failed`).
    Commands print through this, so that a broken pipe or a full disk elsewhere is never taken for
    stdout's."""
    import click

    try:
        click.echo(text, nl=nl)
    except OSError as e:
        raise stdout_failed(e) from None


def os_error(e: OSError) -> FlowError:
    """An OSError that reached the command line's error printer (no step, sink or `echo` made it an
    error of its own): a file named in the error; else the system's message and the error's type
    (a socket's EPIPE or EIO is not stdout's: stdout is left alone), exit 1."""
    if e.filename is not None:
        return FlowRuntimeError(Problem(f"{e.strerror or e}", Location(os.fsdecode(e.filename))))
    error = FlowRuntimeError(Problem(f"{type(e).__name__}: {e.strerror or e}",
                                     hint="run with --debug for the traceback"))
    error.__cause__ = e  # what --debug prints
    return error


def format_size(size: int) -> str:
    """`10 MiB`, `64 KiB`, `1,000,000 bytes`: the largest binary unit that divides `size`."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size:,} bytes"
