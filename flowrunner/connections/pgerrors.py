"""asyncpg's many ways of saying that the server went away, as one error. Its own module, with no
imports of the rest of flowrunner's connections: the history store and the vector steps use it, and
connections.postgres uses them."""

from __future__ import annotations

from .. import secrets
from ..errors import StepFailed


def lost_connection(e: BaseException, where: str) -> StepFailed | None:
    """The server went away (stopped, restarted, the backend terminated, the network cut): one
    retryable error that says so, whichever of asyncpg's many exceptions reported it; None for any
    other error. asyncpg reports a connection that broke between two messages of one exchange as
    `InternalClientError: cannot switch to state N`, which no user can read."""
    import asyncpg
    from asyncpg.exceptions import AdminShutdownError, CannotConnectNowError, CrashShutdownError
    from asyncpg.exceptions._base import InternalClientError

    server = where if where.startswith("the embedded") else f"PostgreSQL at {where}"
    if isinstance(e, InternalClientError):
        detail = "the connection broke in the middle of an operation"
    elif isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
        detail = f"the server is not running or not listening ({e.strerror or type(e).__name__})"
    elif isinstance(e, (OSError, asyncpg.PostgresConnectionError, AdminShutdownError, CrashShutdownError,
                        CannotConnectNowError)) or (isinstance(e, asyncpg.InterfaceError) and not isinstance(e, ValueError)):
        detail = secrets.redact(str(e)) or type(e).__name__
    else:
        return None
    return StepFailed(f"lost the connection to {server}: {detail}", retryable=True,
                      hint="check that the server is running; a retry (retry: 3 on the step) reconnects")
