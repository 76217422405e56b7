"""What history_load and history_save share at load time: their common properties and connection
types. Plain data, so that building the schema (`validate`) imports no SQL code."""

from __future__ import annotations

from typing import Any

from ..identifiers import table_property

DEFAULT_TABLE = "chat_history"
MAX_CONVERSATION_ID = 256
CONNECTION_TYPES = ("sqlserver", "postgres", "sqlite")
PROPERTIES: dict[str, dict[str, Any]] = {
    "conversation_id": {"type": "string", "minLength": 1, "maxLength": MAX_CONVERSATION_ID,
                        "description": "the conversation (up to 256 characters)"},
    "table": table_property("the history table, optionally schema.table", default=DEFAULT_TABLE),
    "create": {"type": "boolean", "default": False,
               "description": "create the table (and its index) when it is missing"},
}
NO_CONNECTION = "without `connection:`, the embedded SQLite history file in the user's data directory"
