"""`vector_upsert`: embed documents (files by glob, chunked; or a list from a variable) and upsert
them into a pgvector table by a stable id, so a re-run changes nothing and embeds nothing again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import Problem, StepFailed
from ..vector import embeddings
from ..vector.chunking import chunk_text
from ..vector.table import METRICS, SCHEMA_FRAGMENT, VectorTable, explain_db_error
from .base import Outputs, Step, ref_or

if TYPE_CHECKING:
    from ..engine import StepContext
    from ..events import Event
    from ..flow.model import StepSpec

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".text"}


class VectorUpsertStep(Step):
    type_name = "vector_upsert"
    summary = "Embeds documents (files by glob, or a list) and upserts them into a pgvector table."
    connection_types = ("postgres",)
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        **SCHEMA_FRAGMENT,
        "files": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                  "description": "glob(s) of text/markdown files, relative to the flow file's folder"},
        "documents": ref_or({"type": "array"}) | {
            "description": "texts, or {id, content, metadata} objects (e.g. from a variable)"},
        "embedding": embeddings.SCHEMA,
        "chunk_size": {"type": "integer", "minimum": 50, "default": 1000, "description": "characters per chunk"},
        "chunk_overlap": {"type": "integer", "minimum": 0, "default": 200},
        "create": {"type": "boolean", "default": False,
                   "description": "create the extension, the table and its HNSW index if missing"},
        "metric": {"enum": list(METRICS), "default": "cosine", "description": "the HNSW index's metric (with create)"},
    }
    required = ("connection", "table", "embedding")
    outputs = {"upserted": "chunks embedded and written", "unchanged": "chunks already stored as they are",
               "removed": "stored chunks of these files that they no longer have (the file shrank)",
               "chunks": "chunks in all", "ids": "the ids of all chunks"}
    example = """\
- id: ingest
  type: vector_upsert
  connection: docs
  table: documents
  files: docs/**/*.md
  embedding: {connection: llm, model: text-embedding-3-small}
  chunk_size: 1000
  chunk_overlap: 200
  create: true
"""

    @classmethod
    def check(cls, spec: StepSpec, flow: Any) -> list[Problem]:
        props = spec.props
        problems = []
        if ("files" in props) == ("documents" in props):
            problems.append(Problem("give exactly one of `files` (globs) or `documents` (a list)", spec.location,
                                    f"steps[{spec.index}]"))
        if isinstance(props.get("embedding"), dict):
            problems += embeddings.check(props["embedding"], flow.connections, spec)
        return problems

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        from ..events import Progress

        p = ctx.props
        vt = VectorTable.from_props(p)
        size, overlap = int(p.get("chunk_size", 1000)), int(p.get("chunk_overlap", 200))
        sources: list[str] = []  # the files read, even those now empty
        if p.get("files") is not None:
            chunks = _file_chunks(p["files"], Path(ctx.run.flow.file).parent, size, overlap, sources)
        else:
            chunks = _document_chunks(p["documents"], size, overlap)
        db = await ctx.connection()
        try:
            if p.get("create"):
                await db.enable_vectors()
            stored = await _stored(db, vt, [c[0] for c in chunks], create=bool(p.get("create")))
        except Exception as e:
            raise explain_db_error(e, vt, db.where) from None
        todo = [c for c in chunks if stored.get(c[0]) != (_md5(c[1]), c[2])]
        total, done = len(chunks), len(chunks) - len(todo)
        yield Progress(ctx.step_id, done, total, "unchanged chunks skipped")
        embedder = await embeddings.embedder_for(p["embedding"], ctx)
        batch = int(p["embedding"].get("batch_size") or embeddings.DEFAULT_BATCH)
        created = not p.get("create")  # with create, the first batch's width sizes the new table
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            vectors = await embedder.embed([c[1] for c in part])
            try:
                if not created:
                    for statement in vt.create_sql(len(vectors[0]), p.get("metric", "cosine")):
                        await db.pool.execute(statement)
                    created = True
                async with db.pool.acquire() as conn, conn.transaction():
                    await conn.executemany(vt.upsert_sql(), [(c[0], c[1], c[2], v) for c, v in zip(part, vectors)])
            except Exception as e:
                raise explain_db_error(e, vt, db.where) from None
            done += len(part)
            yield Progress(ctx.step_id, done, total, "embedded and upserted")
        ids, removed = [c[0] for c in chunks], 0
        if sources:  # ids are ours (`<file>#<n>`); a document's id is its author's
            try:  # after every upsert went in: a failed run leaves the old chunks in place, not none
                status = await db.pool.execute(vt.stale_sql(), sources, ids)
            except Exception as e:
                raise explain_db_error(e, vt, db.where) from None
            removed = int(status.split()[-1])
        yield Outputs({"upserted": len(todo), "unchanged": total - len(todo), "removed": removed, "chunks": total,
                       "ids": ids})


Chunk = tuple[str, str, dict[str, Any]]  # id, content, metadata


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode("utf-8")).hexdigest()  # noqa: S324 - a change check, not security


async def _stored(db: Any, vt: Any, ids: list[str], *, create: bool) -> dict[str, tuple[str, Any]]:
    """What the table already holds for these ids: id -> (md5 of content, metadata). A missing
    table is empty when `create` is set."""
    import asyncpg

    try:
        rows = await db.pool.fetch(vt.existing_sql(), ids)
    except asyncpg.UndefinedTableError:
        if create:
            return {}
        raise
    return {r[0]: (r[1], r[2]) for r in rows}


def _file_chunks(globs: str | list[str], base: Path, size: int, overlap: int, sources: list[str]) -> list[Chunk]:
    """The chunks of the files the globs match; their paths (as in the ids) are added to `sources`."""
    patterns = [globs] if isinstance(globs, str) else list(globs)
    files: list[Path] = []
    for pattern in patterns:
        root = Path(pattern).expanduser()
        matches = sorted(root.parent.glob(root.name) if root.is_absolute() else base.glob(pattern))
        files.extend(m for m in matches if m.is_file() and m.suffix.lower() in TEXT_SUFFIXES and m not in files)
    if not files:
        raise StepFailed(f"no text or markdown files match {', '.join(patterns)} (relative to {base})",
                         hint=f"files are {', '.join(sorted(TEXT_SUFFIXES))}; globs are relative to the flow file's folder")
    out: list[Chunk] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StepFailed(f"cannot read {file}: {e}") from None
        source = str(file.relative_to(base)) if file.is_relative_to(base) else str(file)
        sources.append(source)
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), None)
        for i, piece in enumerate(chunk_text(text, size, overlap)):
            meta = {"source": source, "chunk": i, **({"title": title} if title else {})}
            out.append((f"{source}#{i}", piece, meta))
    return out


def _document_chunks(documents: Any, size: int, overlap: int) -> list[Chunk]:
    if not isinstance(documents, list):
        raise StepFailed(f"documents must be a list, got {type(documents).__name__}")
    out: list[Chunk] = []
    for n, doc in enumerate(documents):
        if isinstance(doc, str):
            doc = {"content": doc}
        if not isinstance(doc, dict) or not isinstance(doc.get("content"), str):
            raise StepFailed(f"documents[{n}] must be text or an object with `content`")
        import hashlib

        base_id = str(doc.get("id") or hashlib.sha1(doc["content"].encode()).hexdigest()[:16])  # noqa: S324
        meta = doc.get("metadata") or {}
        pieces = chunk_text(doc["content"], size, overlap)
        for i, piece in enumerate(pieces):
            out.append((base_id if len(pieces) == 1 else f"{base_id}#{i}", piece, {**meta, "chunk": i}))
    return out
