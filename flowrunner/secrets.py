"""Secret values (API keys, DSN passwords, ODBC strings) known to this process, and their redaction.

Every secret a connection resolves is registered here; logs, error messages and event sinks pass
their text through `redact` so no secret is ever printed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# Passwords inside connection strings, in case a driver echoes a reformatted one.
_PASSWORD_PARTS = (
    re.compile(r"(?i)\b(?:pwd|password)\s*=\s*(\{[^}]*\}|[^;]*)"),
    re.compile(r"://[^:/@\s]+:([^@\s]+)@"),
)


MIN_SECRET = 8  # shorter whole values (e.g. api_key: ollama) are not secrets, and masking them would
MIN_PART = 4  # garble ordinary text; a password inside a connection string is masked from 4 characters


def register(value: Any, *, whole: bool = True) -> None:
    """Mask `value` from now on (when `whole`), and any password inside it (DSN, ODBC string, URL)."""
    global _pattern
    if not isinstance(value, str):
        return
    found = {value} if whole and len(value) >= MIN_SECRET else set()
    for rx in _PASSWORD_PARTS:
        for m in rx.finditer(value):
            part = m.group(1).strip("{}")
            if len(part) >= MIN_PART:
                found.add(part)
    if found - _secrets:
        _secrets.update(found)
        # Longest first, so a DSN is masked whole before its password part is.
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def redact(text: str) -> str:
    if _pattern is None or not text:
        return text
    return _pattern.sub(MASK, text)


def redact_value(value: Any) -> Any:
    """Redact inside strings, lists and dicts (for log records and events)."""
    if _pattern is None:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


def clear() -> None:
    """Forget every secret (tests)."""
    global _pattern
    _secrets.clear()
    _pattern = None
