"""`flowrunner serve FLOW`: check the flow, open its connections, bind the port, then hand the
socket to uvicorn. Anything wrong with the set-up is a clear error before the first request."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Coroutine, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import click

from ..errors import FlowDefinitionError
from ..files import DEFAULT_MAX_BODY


def serve(flow_path: Path, host: str, port: int, connections_file: Path | None, message_input: str | None,
          api_key: str | Sequence[str] | None, keepalive: float, obj: dict[str, Any], *,
          max_body_size: int = DEFAULT_MAX_BODY, grace: float | None = None, cors_origins: Sequence[str] = (),
          max_streams: int | None = None, per_key_streams: int | None = None, per_key_rpm: int | None = None,
          workers: int = 1) -> int:
    from .. import logs
    from ..conversation import ChatInputs
    from ..flow.build import load_flow_with

    flow = load_flow_with(flow_path, connections_file)
    chat = ChatInputs.of(flow, message_input)
    keys = api_keys(api_key)
    if keys:
        from .. import secrets

        for key in keys:
            secrets.register(key)
    front = _front(keys, grace, cors_origins, max_streams, per_key_streams, per_key_rpm, workers)
    sock = _bind(host, port)
    # Info by default, on a terminal too: a server streams no answer there for log lines to break up,
    # and its one `request` line per request is what an operator watches (each run's own lines: -v).
    logs.configure(obj.get("log_format"), obj.get("log_level") or "info", quiet_runs=obj.get("log_level") is None)
    if "*" in cors_origins:
        import structlog

        structlog.get_logger("flowrunner.serve").warning(
            "--cors-origin '*': any web page may call this server" + ("" if keys else ", and it needs no --api-key"))
    if workers > 1:  # workers.py: the parent forks them and waits; each worker goes on below
        from .workers import StopServing, Supervisor

        try:  # StopServing is raised in a worker only (its SIGTERM), maybe before it began to serve
            outcome = Supervisor(workers, sock, lambda pids: _announce(chat, sock, pids)).run()
            if isinstance(outcome, int):
                return outcome  # the parent, at the end
            with suppress(KeyboardInterrupt):
                _run(_serve(chat, sock, keys or None, keepalive, max_body_size, front, outcome))
        except StopServing:
            pass  # the parent stopped it, and says so once
        return 0
    _run(_serve(chat, sock, keys or None, keepalive, max_body_size, front))
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop where it is installed: its event loop costs less per chunk than asyncio's, so one
    process holds more streams. (uvicorn picks httptools for HTTP/1.1 by itself, when installed.)"""
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main)
            return
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    finally:
        main.close()  # stopped before it began (a worker's SIGTERM): no "never awaited" warning


def _serving(chat: Any, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    return f"serving flow '{chat.flow.name}' at {where} (model '{chat.flow.name}'); Ctrl-C stops"


def _announce(chat: Any, sock: socket.socket, pids: list[int]) -> None:
    """--workers: once every worker is ready."""
    import structlog

    structlog.get_logger("flowrunner.serve").info("workers started", workers=len(pids), pids=pids)
    click.echo(_serving(chat, sock), err=True)  # last: what a supervisor (or a test) waits for


def api_keys(given: str | Sequence[str] | None) -> tuple[str, ...]:
    """--api-key's keys (given several times, or several in one value or in $FLOWRUNNER_API_KEY,
    separated by commas or spaces). A key pasted with a line break (`$(cat key.txt)` keeps none, an
    env file may) is the key without it: clients send it bare, and an unstripped key would answer
    every one of them 401."""
    values = [given] if isinstance(given, str) else list(given or ())
    if not values:
        values = [os.environ.get("FLOWRUNNER_API_KEY") or ""]
    keys = (key for value in values for key in re.split(r"[\s,]+", value) if key)
    return tuple(dict.fromkeys(keys))


def _front(keys: tuple[str, ...], grace: float | None, cors_origins: Sequence[str], max_streams: int | None,
           per_key_streams: int | None, per_key_rpm: int | None, workers: int = 1) -> dict[str, Any]:
    """What stands before the flow: the limits per client, CORS, the drain's grace (for _serve)."""
    if (per_key_streams or per_key_rpm) and not keys:
        option = "--max-streams-per-key" if per_key_streams else "--rate-limit-per-key"
        raise FlowDefinitionError.at(f"{option} limits each API key, and serve has none",
                                     hint="give each client its key: --api-key KEY1 --api-key KEY2 ...")
    admission = None
    if max_streams or per_key_streams or per_key_rpm:
        from .admission import Admission

        admission = Admission(max_streams, per_key_streams, per_key_rpm, workers)
    return {"admission": admission, "cors_origins": tuple(cors_origins), "grace": grace}


async def _serve(chat: Any, sock: socket.socket, api_key: tuple[str, ...] | None, keepalive: float,
                 max_body_size: int, front: dict[str, Any] | None = None, worker: Any = None) -> None:
    import uvicorn

    from ..connections.pool import Connections
    from ..engine import check_connections
    from .app import Served, create_app
    from .wire import with_raw_send
    from .server import Server

    async with Connections(chat.flow) as connections:
        # Every unset ${env.X} of the connections the steps use, at once, checked once (a request may
        # name a conversation: the history store counts); each is opened now: a wrong setting fails
        # here, not per request.
        for name in check_connections(chat.flow, connections):
            await connections.get(name)
        front = dict(front or {})
        grace = front.pop("grace", None)
        served = Served(chat, connections, api_key, keepalive, max_body_size, **front)
        app = with_raw_send(create_app(served))
        # proxy_headers off: serve reads no X-Forwarded-* (it logs no client address), and uvicorn's
        # middleware for them would parse every request's client address for nothing.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, ws="none", proxy_headers=False)
        if worker is None:
            click.echo(_serving(chat, sock), err=True)
        else:  # the parent says it, once every worker is ready
            worker.ready()
        await Server(config, served, *([] if grace is None else [grace])).serve(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # The protocol matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP, and
        # with Nagle on a first chunk waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(info[0], info[1], info[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise FlowDefinitionError.at(f"cannot listen on {host}:{port}: {e.strerror or e}",
                                     hint="is another server on that port? choose one with --port") from None
    sock.set_inheritable(True)
    return sock
