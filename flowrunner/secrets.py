"""Secret values (API keys, DSN passwords, ODBC strings) known to this process, and their redaction.

Every secret a connection resolves is registered here; logs, error messages and event sinks pass
their text through `redact` so no secret is ever printed.

A server or a driver rarely echoes a secret the way it was written: it URL-encodes it (`p%40ss`,
`p+ss`), escapes it inside a JSON or Python string (`sk-abc\\n`, `\\'`), doubles a `}` inside ODBC braces,
quotes it, or folds its whitespace. So each secret is matched in every one of those spellings: its
pattern accepts, for each character, the character itself or any of its encodings. Text is masked
before it is cut to a length (`shorten`): a cut secret no longer matches."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, unquote_plus

MASK = "***"
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

MIN_SECRET = 8  # shorter whole values (e.g. api_key: ollama) are not secrets, and masking them would
MIN_PART = 4  # garble ordinary text; a password inside a connection string is masked from 4 characters

# Passwords inside connection strings, as written: `PWD={p}}w}` or `PWD=p w;` (ODBC: to the `;`),
# `password='p\\'w'` or `password=pw` (libpq key=value: to a space), `?password=p%40w` (a URL's query:
# to the `&`), and a URL's `user:p%40w@`.
_QUOTED = r"\{(?:[^}]|\}\})*\}|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_KEY = r"(?i)\b(?:pwd|password)\s*=\s*"
_ODBC = re.compile(_KEY + rf"({_QUOTED}|[^;]*)")
_LIBPQ = re.compile(_KEY + rf"({_QUOTED}|\S*)")
_QUERY = re.compile(_KEY + r"([^&#\s]*)")
_USERINFO = re.compile(r"://([^/?#\s@]*(?:@[^/?#\s@]*)*)@")  # the whole userinfo, up to the host's @


def _decoded(raw: str, url: bool) -> set[str]:
    """What a password written as `raw` is: without braces or quotes and their escapes, URL-decoded."""
    raw = raw.strip()
    if raw[:1] == "{" and raw[-1:] == "}":
        return {raw[1:-1].replace("}}", "}")}
    if raw[:1] in ("'", '"') and len(raw) > 1 and raw[-1:] == raw[:1]:
        return {re.sub(r"\\(.)", r"\1", raw[1:-1])}
    return {unquote_plus(raw), unquote(raw)} if url else {raw}


def parts(value: str) -> set[str]:
    """The passwords inside a connection string or URL, decoded."""
    url = "://" in value
    found: set[str] = set()
    for m in (_QUERY if url else _ODBC if ";" in value else _LIBPQ).finditer(value):
        found |= _decoded(m.group(1), url)
    for m in _USERINFO.finditer(value):
        _user, sep, password = m.group(1).partition(":")
        if sep:
            found |= _decoded(password, url=True)
    return {p.strip() for p in found if len(p.strip()) >= MIN_PART}


def register(value: Any, *, whole: bool = True) -> None:
    """Mask `value` from now on (when `whole`), and any password inside it (DSN, ODBC string, URL).
    Surrounding whitespace is not part of a secret (a key read with its trailing newline)."""
    global _pattern
    if not isinstance(value, str):
        return
    found = {value.strip()} if whole and len(value.strip()) >= MIN_SECRET else set()
    found |= parts(value)
    if found - _secrets:
        _secrets.update(found)
        # Longest first, so a DSN is masked whole before its password part is.
        _pattern = re.compile("|".join(_spellings(s) for s in sorted(_secrets, key=len, reverse=True)))


def _spellings(secret: str) -> str:
    """A pattern for `secret` in any encoding a server or a log may give it (see the module's doc)."""
    out: list[str] = []
    for i, c in enumerate(secret):
        if c.isspace() and i and secret[i - 1].isspace():
            continue  # a run of whitespace is one pattern: servers fold it
        out.append(_char(c))
    return "".join(out)


_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "/": "\\/"}  # in a JSON or Python string
_DOUBLED = {"}": "}}", "'": "''", '"': '""'}  # ODBC braces, SQL and CSV quoting
_SPACE = r"(?:\s|\+|%(?:20|09|0[aAdD])|\\[ntr]|\\u00(?:20|09|0[aAdD]))+"  # folded, encoded or escaped


def _char(c: str) -> str:
    if c.isspace():
        return _SPACE
    options = [re.escape(c)]
    options += [re.escape(x) for x in (_ESCAPES.get(c), _DOUBLED.get(c)) if x]
    if not c.isalnum() or not c.isascii():  # URL-encoded: %XX per UTF-8 byte, either case
        options.append("".join(f"%(?i:{b:02x})" for b in c.encode()))
    if not c.isascii() or not c.isprintable():  # JSON's and Python's escapes: \u00e9, \xe9, \U0001f600
        n = ord(c)
        if n <= 0xFF:
            options.append(rf"\\(?i:x{n:02x})")
        if n <= 0xFFFF:
            options.append(rf"\\(?i:u{n:04x})")
        else:
            high, low = 0xD800 + ((n - 0x10000) >> 10), 0xDC00 + ((n - 0x10000) & 0x3FF)
            options += [rf"\\(?i:U{n:08x})", rf"\\(?i:u{high:04x})\\(?i:u{low:04x})"]
    # Longer spellings first: `}}` must be taken whole, not as `}` and a stray `}`.
    return "(?:" + "|".join(sorted(set(options), key=len, reverse=True)) + ")"


def redact(text: str) -> str:
    if _pattern is None or not text:
        return text
    return _pattern.sub(MASK, text)


def shorten(text: str, limit: int) -> str:
    """`text` masked, then cut to `limit` characters: cut first, a secret's start would stay visible."""
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + "..."


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
