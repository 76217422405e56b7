"""What each connection type accepts. Opening a connection lives in the type's own module, named by
`opener`; the engine opens a connection the first time a step asks for it, once per run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_SECONDS = {"type": "number", "exclusiveMinimum": 0}


@dataclass(frozen=True, eq=False)
class Need:
    """One of `fields` must have a value (`only_if_given`: when one is written as ${env.X}; not
    written at all, the type has a default). `words` say what it is in messages; `at_field`: an
    error points at the field's ${env.X}, else at the connection (no one field is at fault)."""

    words: str
    fields: tuple[str, ...]
    at_field: bool = True
    only_if_given: bool = False


@dataclass(frozen=True, eq=False)
class ConnectionType:
    """A connection type: its properties' schema, its secret fields and what it needs set."""

    name: str
    summary: str
    properties: dict[str, dict[str, Any]]
    secrets: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    opener: str | None = None  # "module:function", imported only when a step uses the connection
    # What it cannot open without, known before the first step runs (so that a run never fails over
    # a missing environment variable after it has done some work):
    needs: tuple[Need, ...] = ()
    env_defaults: dict[str, str] = field(default_factory=dict)  # a field not written reads this variable
    headers: tuple[str, ...] = ()  # fields sent as HTTP header values: no line break can be inside

    def schema(self) -> dict[str, Any]:
        # writeOnly (JSON Schema's word for a value never shown back): validation messages leave it out.
        props = {k: {**v, "writeOnly": True} if k in self.secrets else v for k, v in self.properties.items()}
        return {"properties": props, "required": list(self.required)}


CONNECTION_TYPES: dict[str, ConnectionType] = {
    c.name: c
    for c in (
        ConnectionType(
            "openai",
            "OpenAI, or any OpenAI-compatible server through base_url",
            {
                "api_key": {"type": "string", "description": "secret; usually ${env.OPENAI_API_KEY}"},
                "base_url": {"type": "string", "description": "e.g. http://localhost:11434/v1"},
                "organization": {"type": "string"},
                "project": {"type": "string"},
                "timeout": {**_SECONDS, "description": "seconds; also the longest silence inside a stream"},
                "max_retries": {"type": "integer", "minimum": 0},
            },
            secrets=("api_key",),
            headers=("api_key", "organization", "project"),
            opener="flowrunner.connections.openai:open_openai",
            needs=(Need("an API key", ("api_key", "base_url")),),  # a local server (base_url) takes any key
            env_defaults={"api_key": "OPENAI_API_KEY"},  # as the openai SDK does
        ),
        ConnectionType(
            "azure_openai",
            "Azure OpenAI",
            {
                "endpoint": {"type": "string", "description": "https://NAME.openai.azure.com"},
                "api_key": {"type": "string", "description": "secret"},
                "azure_ad_token": {"type": "string", "description": "secret: an Entra ID bearer token"},
                "api_version": {"type": "string"},
                "deployment": {"type": "string"},
                "timeout": _SECONDS,
                "max_retries": {"type": "integer", "minimum": 0},
            },
            secrets=("api_key", "azure_ad_token"),
            headers=("api_key", "azure_ad_token"),
            required=("endpoint",),
            opener="flowrunner.connections.openai:open_azure_openai",
            needs=(Need("endpoint", ("endpoint",)),
                   Need("api_key or azure_ad_token", ("api_key", "azure_ad_token"), at_field=False)),
        ),
        ConnectionType(
            "postgres",
            "PostgreSQL with pgvector; without dsn, the embedded server",
            {
                "dsn": {"type": "string", "description": "secret: postgresql://user:pass@host/db"},
                "data_dir": {"type": "string", "description": "the embedded server's data directory"},
                "pool_size": {"type": "integer", "minimum": 1},
                "timeout": _SECONDS,
            },
            secrets=("dsn",),
            opener="flowrunner.connections.postgres:open_postgres",
            needs=(Need("a dsn", ("dsn",), only_if_given=True),),  # no dsn: the embedded server
        ),
        ConnectionType(
            "sqlserver",
            "SQL Server through pyodbc",
            {
                "odbc": {"type": "string", "description": "secret: an ODBC connection string, e.g. "
                         "DRIVER={ODBC Driver 18 for SQL Server};SERVER=host;DATABASE=db;UID=u;PWD=p"},
                "pool_size": {"type": "integer", "minimum": 1, "description": "worker threads and connections (4)"},
                "timeout": {**_SECONDS, "description": "seconds for login and for each statement (30)"},
            },
            secrets=("odbc",),
            required=("odbc",),
            opener="flowrunner.connections.sqlserver:open_sqlserver",
            needs=(Need("an ODBC connection string", ("odbc",)),),
        ),
        ConnectionType(
            "sqlite",
            "an SQLite file (the embedded history default)",
            {"path": {"type": "string", "description": "the database file; relative to the flow file's directory"},
             "timeout": {**_SECONDS, "description": "seconds to wait for a lock held by another writer"}},
            opener="flowrunner.connections.sqlite:open_sqlite",
            needs=(Need("path", ("path",), only_if_given=True),),  # no path: the default history file
        ),
    )
}


def connection_problem(name: object, allowed: tuple[str, ...], declared: dict[str, str],
                       user: str) -> tuple[str, str | None] | None:
    """Why `name` cannot be the connection of `user` ("a chat_completion step", "embeddings"), as
    (message, hint); None when it can. `declared` maps each connection's name to its type. Used when a
    flow is loaded, and at run time for a name that came through a ${...} reference."""
    from ..errors import did_you_mean

    if not isinstance(name, str) or name not in declared:
        names = sorted(declared)
        shown = f"'{name}'" if isinstance(name, str) else f"(a {type(name).__name__})"
        listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        hint = (did_you_mean(name, names[:200]) if isinstance(name, str) else None) or (
            f"declare it under connections: (declared: {listed})" if names
            else "declare it under connections:, or pass --connections FILE")
        return f"unknown connection {shown}", hint
    if declared[name] not in allowed:
        return f"connection '{name}' is {declared[name]}, but {user} needs {' or '.join(allowed)}", None
    return None


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what HTTP forbids in a header value (a tab is allowed)


def clean_field(ctype: ConnectionType, key: str, value: Any) -> tuple[Any, str | None]:
    """A field's value as the connection will use it, and why it cannot be used (None: it can).

    A secret or a header value loses its surrounding whitespace: a trailing newline from `echo`,
    `$(cat key.txt)` or a secrets file is never part of a key, and sent as is it fails every request
    (and the HTTP library's error would show the key). A header value with a control character or a
    non-ASCII character still inside cannot be sent at all. The reason never holds the value."""
    if not isinstance(value, str) or (key not in ctype.secrets and key not in ctype.headers):
        return value, None
    value = value.strip()
    if key in ctype.headers:
        if _CONTROL.search(value):
            return value, "contains a line break or another control character"
        if not value.isascii():
            return value, "contains a character that is not ASCII (it cannot be sent in an HTTP header)"
    return value, None
