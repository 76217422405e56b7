"""The SQL of the history table in each dialect. No SQL Server runs here, so every T-SQL statement is
parsed with sqlglot (read="tsql"), its shape checked, and its placeholders counted against what the
store binds. The PostgreSQL and SQLite statements run for real in test_history.py."""

from __future__ import annotations

import pytest
import sqlglot
from sqlglot import exp

from flowrunner.connections.sqlserver import describe_odbc, odbc_message, parse_odbc
from flowrunner.errors import StepFailed
from flowrunner.history.sql import SQLITE, TSQL, UPSERT_COLUMNS

TABLES = ["chat_history", "dbo.chat_history", "History_2024"]


def parse(sql: str) -> exp.Expression:
    (tree,) = sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert tree is not None
    return tree


def placeholders(tree: exp.Expression) -> int:
    return len(list(tree.find_all(exp.Placeholder)))


@pytest.mark.parametrize("table", TABLES)
def test_tsql_create_statements(table: str) -> None:
    create_table, create_index = (parse(s) for s in TSQL.create_statements(table))
    for tree in (create_table, create_index):
        assert isinstance(tree, exp.IfBlock)  # idempotent: guarded by IF OBJECT_ID / IF NOT EXISTS
    ddl = create_table.find(exp.Create)
    assert ddl is not None and ddl.kind == "TABLE"
    columns = {c.name: c for c in ddl.find_all(exp.ColumnDef)}
    assert list(columns) == ["seq", "message_id", "conversation_id", "role", "content", "status", "run_id",
                             "metadata", "created_at"]
    sql = {name: col.sql("tsql") for name, col in columns.items()}
    assert "BIGINT IDENTITY(1, 1)" in sql["seq"] and "PRIMARY KEY" in sql["seq"]
    assert "NVARCHAR(MAX)" in sql["content"] and "NVARCHAR(MAX)" in sql["metadata"]
    assert "DATETIME2" in sql["created_at"] and "SYSUTCDATETIME()" in sql["created_at"]
    assert "UNIQUE ([conversation_id], [message_id])" in create_table.sql("tsql")
    index = create_index.find(exp.Create)
    assert index is not None and index.kind == "INDEX"
    assert [c.name for c in index.find_all(exp.Column)][-2:] == ["conversation_id", "seq"]
    expected_table = table.split(".")[-1]
    assert {t.name for t in create_table.find_all(exp.Table)} >= {expected_table}


@pytest.mark.parametrize("table", TABLES)
def test_tsql_load_binds_limit_then_conversation(table: str) -> None:
    sql, limit_first = TSQL.load_sql(table)
    tree = parse(sql)
    assert isinstance(tree, exp.Select) and limit_first
    assert "TOP (?)" in tree.sql("tsql") and placeholders(tree) == 2
    order = tree.args["order"].expressions[0]
    assert order.this.name == "seq" and order.args.get("desc")
    assert [e.alias_or_name for e in tree.expressions] == ["seq", "role", "content", "status"]


@pytest.mark.parametrize("table", TABLES)
def test_tsql_upsert_is_one_merge_with_every_column_bound(table: str) -> None:
    tree = parse(TSQL.upsert_sql(table))
    assert isinstance(tree, exp.Merge)
    assert placeholders(tree) == len(UPSERT_COLUMNS)
    text = tree.sql("tsql")
    assert "WITH (HOLDLOCK)" in text and "WHEN MATCHED THEN UPDATE" in text and "WHEN NOT MATCHED THEN INSERT" in text


def test_tsql_lock_is_a_transaction_applock_whose_result_is_read() -> None:
    trees = sqlglot.parse(TSQL.lock_sql() or "", read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert [type(t).__name__ for t in trees] == ["Set", "Declare", "Execute", "Select"]
    assert sum(placeholders(t) for t in trees) == 1
    assert trees[2].sql("tsql").startswith("EXECUTE @r = sp_getapplock")
    assert "@LockOwner = 'Transaction'" in trees[2].sql("tsql") and trees[3].sql("tsql") == "SELECT @r"


@pytest.mark.parametrize("bad", ["chat history", "x;DROP TABLE y", 'a"b', "a]b", "1table", "a.b.c", "", None])
def test_table_names_are_validated_before_any_sql_is_built(bad) -> None:
    for dialect in (TSQL, SQLITE):
        with pytest.raises(StepFailed, match="is not a valid name"):
            dialect.upsert_sql(bad)


def test_odbc_strings_are_parsed_and_described_without_the_password() -> None:
    odbc = "Driver={ODBC Driver 18 for SQL Server};Server=tcp:db.example,1433;Database=chat;Uid=app;Pwd={p;a}}ss};Encrypt=yes"
    parts = parse_odbc(odbc)
    assert parts["DRIVER"] == "ODBC Driver 18 for SQL Server" and parts["PWD"] == "p;a}ss"
    assert describe_odbc(odbc) == "tcp:db.example,1433/chat"
    assert describe_odbc("DSN=history") == "history"
    assert describe_odbc("Driver=x;Pwd=secret") == "the configured ODBC connection"


def test_odbc_messages_lose_the_driver_noise() -> None:
    error = Exception("08001", "[08001] [Microsoft][ODBC Driver 18 for SQL Server]Login timeout expired (0) (SQLDriverConnect)")
    assert odbc_message(error) == "Login timeout expired"
