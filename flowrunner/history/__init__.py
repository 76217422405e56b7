"""Chat history: one table layout (sql.py) over SQL Server, PostgreSQL and SQLite (store.py)."""
