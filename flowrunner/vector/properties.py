"""What vector_search and vector_upsert share at load time: the metrics and the table's schema
properties. Plain data, so that building the schema (`validate`) imports no SQL code."""

from __future__ import annotations

from typing import Any

from ..identifiers import IDENT_PATTERN, table_property

METRICS = {  # metric: (operator, index opclass, distance -> score in the metric's natural direction)
    "cosine": ("<=>", "vector_cosine_ops", "1 - distance"),
    "inner_product": ("<#>", "vector_ip_ops", "-distance"),
    "l2": ("<->", "vector_l2_ops", "distance"),
}
DEFAULT_COLUMNS = {"id": "id", "content": "content", "embedding": "embedding", "metadata": "metadata"}

_COLUMN = {"type": "string", "pattern": IDENT_PATTERN,
           "description": "a valid column name (letters, digits and _, at most 63)"}
SCHEMA_FRAGMENT: dict[str, dict[str, Any]] = {
    "table": table_property("table name, optionally schema.table"),
    "columns": {
        "type": "object",
        "additionalProperties": False,
        "properties": {k: _COLUMN for k in DEFAULT_COLUMNS},
        "description": "column names, default {id: id, content: content, embedding: embedding, metadata: metadata}",
    },
}
