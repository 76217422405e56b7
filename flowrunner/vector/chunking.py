"""Text into overlapping chunks for embedding: split at paragraphs, then sentences, then words, and
pack the pieces up to `size` characters, carrying about `overlap` characters into the next chunk."""

from __future__ import annotations

import re

_SPLITTERS = (re.compile(r"\n\s*\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


def _pieces(text: str, size: int, level: int = 0) -> list[str]:
    if len(text) <= size:
        return [text]
    if level >= len(_SPLITTERS):
        return [text[i : i + size] for i in range(0, len(text), size)]
    out: list[str] = []
    for part in _SPLITTERS[level].split(text):
        if part.strip():
            out.extend(_pieces(part.strip(), size, level + 1))
    return out


def chunk_text(text: str, size: int = 1000, overlap: int = 200) -> list[str]:
    text = text.strip()
    if not text:
        return []
    overlap = max(0, min(overlap, size // 2))
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for piece in _pieces(text, size):
        if current and length + len(piece) + 1 > size:
            chunks.append(" ".join(current))
            carried: list[str] = []  # the tail of this chunk starts the next one
            while current and sum(len(p) + 1 for p in carried) + len(current[-1]) <= overlap:
                carried.insert(0, current.pop())
            current, length = carried, sum(len(p) + 1 for p in carried)
        current.append(piece)
        length += len(piece) + 1
    if current:
        chunks.append(" ".join(current))
    return chunks
