"""What each connection type accepts. Opening a connection lives in the type's own module, named by
`opener`; the engine opens a connection the first time a step asks for it, once per run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SECONDS = {"type": "number", "exclusiveMinimum": 0}


@dataclass(frozen=True)
class ConnectionType:
    name: str
    summary: str
    properties: dict[str, dict[str, Any]]
    secrets: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    opener: str | None = None  # "module:function", imported only when a step uses the connection

    def schema(self) -> dict[str, Any]:
        return {"properties": self.properties, "required": list(self.required)}


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
            opener="flowrunner.connections.openai:open_openai",
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
            required=("endpoint",),
            opener="flowrunner.connections.openai:open_azure_openai",
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
        ),
        ConnectionType(
            "sqlite",
            "an SQLite file (the embedded history default)",
            {"path": {"type": "string", "description": "the database file; relative to the flow file's directory"},
             "timeout": {**_SECONDS, "description": "seconds to wait for a lock held by another writer"}},
            opener="flowrunner.connections.sqlite:open_sqlite",
        ),
    )
}
