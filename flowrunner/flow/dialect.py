"""JSON Schema's dialect where Python's differs: a schema's `pattern` is an ECMA 262 regex, and
jsonschema hands it to Python's `re` as it is."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def validator_class() -> Any:
    """Draft 2020-12, with `pattern` read as JSON Schema means it (ECMA 262): there `$` is the end of
    the text, where Python's `$` also matches before a final newline, so `table: "chat_history\\n"`
    (an identifier that ends in a newline) would pass a pattern written `^...$`."""
    from jsonschema import Draft202012Validator, ValidationError, validators

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
        if validator.is_type(instance, "string") and not ecma_regex(patrn).search(instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    return validators.extend(Draft202012Validator, {"pattern": pattern})


@lru_cache(maxsize=None)
def ecma_regex(pattern: str) -> Any:
    """`pattern` for Python's re, each `$` outside a character class made `\\Z` (the end, only)."""
    import re

    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = r"\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))
