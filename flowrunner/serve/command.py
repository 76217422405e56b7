"""`flowrunner serve FLOW`: check the flow, open its connections, bind the port, then hand the
socket to uvicorn. Anything wrong with the set-up is a clear error before the first request."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import click

from ..errors import FlowDefinitionError
from ..files import DEFAULT_MAX_BODY


def serve(flow_path: Path, host: str, port: int, connections_file: Path | None, message_input: str | None,
          api_key: str | None, keepalive: float, obj: dict[str, Any], *, max_body_size: int = DEFAULT_MAX_BODY) -> int:
    from .. import logs
    from ..conversation import ChatInputs
    from ..flow.build import load_flow_with

    flow = load_flow_with(flow_path, connections_file)
    chat = ChatInputs.of(flow, message_input)
    # A key pasted with a line break (`$(cat key.txt)` keeps none, an env file may) is the key without it:
    # clients send it bare, and an unstripped key would answer every one of them 401.
    api_key = (api_key or os.environ.get("FLOWRUNNER_API_KEY") or "").strip() or None
    if api_key:
        from .. import secrets

        secrets.register(api_key)
    sock = _bind(host, port)
    # Info by default, on a terminal too: a server streams no answer there for log lines to break up,
    # and its one `request` line per request is what an operator watches (each run's own lines: -v).
    logs.configure(obj.get("log_format"), obj.get("log_level") or "info", quiet_runs=obj.get("log_level") is None)
    asyncio.run(_serve(chat, sock, api_key, keepalive, max_body_size))
    return 0


async def _serve(chat: Any, sock: socket.socket, api_key: str | None, keepalive: float,
                 max_body_size: int) -> None:
    import uvicorn

    from ..connections.pool import Connections
    from ..engine import check_connections
    from .app import Served, create_app
    from .server import Server

    async with Connections(chat.flow) as connections:
        # Every unset ${env.X} of the connections the steps use, at once, checked once (a request may
        # name a conversation: the history store counts); each is opened now: a wrong setting fails
        # here, not per request.
        for name in check_connections(chat.flow, connections):
            await connections.get(name)
        served = Served(chat, connections, api_key, keepalive, max_body_size)
        app = create_app(served)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, ws="none")
        host, port = sock.getsockname()[:2]
        where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
        click.echo(f"serving flow '{chat.flow.name}' at {where} (model '{chat.flow.name}'); Ctrl-C stops", err=True)
        await Server(config, served).serve(sockets=[sock])


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
