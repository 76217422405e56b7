"""SQL identifiers that come from YAML (table and column names): the one pattern they must match, as
JSON Schema properties for load time and as a check for values that came through a reference.

Plain data and one lazily compiled pattern: step types build their schemas from this at import, and
`validate` must not pay for the SQL modules behind them."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

NAME = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
IDENT_PATTERN = rf"^{NAME}$"
TABLE_PATTERN = rf"^{NAME}(\.{NAME})?$"


def table_property(description: str, **extra: Any) -> dict[str, Any]:
    """A `table:` property: a valid name (optionally schema.table), or a reference checked when resolved."""
    return {"anyOf": [{"type": "string", "pattern": TABLE_PATTERN,
                       "description": "a valid table name (letters, digits and _, optionally schema.table)"},
                      {"$ref": "#/$defs/reference"}],
            **extra, "description": description}


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def is_ident(name: object) -> bool:
    """A valid column (or index) name; fullmatch, so a trailing newline is refused too."""
    return isinstance(name, str) and _compiled(IDENT_PATTERN).fullmatch(name) is not None


def is_table(name: object) -> bool:
    """A valid table name, optionally schema.table."""
    return isinstance(name, str) and _compiled(TABLE_PATTERN).fullmatch(name) is not None
