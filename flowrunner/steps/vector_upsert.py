"""`vector_upsert`: embed documents (files by glob, chunked; or a list from a variable) and upsert
them into a pgvector table by a stable id, so a re-run changes nothing and embeds nothing again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import Problem, StepFailed
from ..vector import embeddings
from ..vector.properties import METRICS, SCHEMA_FRAGMENT
from .base import Outputs, Step, ref_or

if TYPE_CHECKING:
    from .context import StepContext
    from ..events import Event
    from ..flow.model import StepSpec
    from ..vector.table import VectorTable

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".text"}


class VectorUpsertStep(Step):
    type_name = "vector_upsert"
    summary = "Embeds documents (files by glob, or a list) and upserts them into a pgvector table."
    connection_types = ("postgres",)
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        **SCHEMA_FRAGMENT,
        "files": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
                  "description": "glob(s) of text/markdown files, relative to the flow file's folder; every file "
                                 "must lie in `root` (symlinks resolved)"},
        "root": {"type": "string", "minLength": 1,
                 "description": "the folder `files` may read from, relative to the flow file's folder (default: "
                                "that folder itself), e.g. `..`; never a reference"},
        "allow_referenced_files": {"type": "boolean", "default": False,
                                   "description": "let `files` come from a ${...} reference (an input): whoever "
                                                  "gives the value picks the files, still only inside `root`"},
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
    def connections_used(cls, spec: StepSpec, run: Any) -> list[str]:
        return [*super().connections_used(spec, run), *embeddings.connections_used(spec.props.get("embedding"), run)]

    @classmethod
    def check(cls, spec: StepSpec, flow: Any) -> list[Problem]:
        props = spec.props
        problems = []
        if ("files" in props) == ("documents" in props):
            problems.append(Problem("give exactly one of `files` (globs) or `documents` (a list)", spec.location,
                                    f"{spec.path_text}"))
        if isinstance(props.get("embedding"), dict):
            problems += embeddings.check(props["embedding"], flow.connections, spec)
        if _from_reference(props.get("files")) and props.get("allow_referenced_files") is not True:
            problems.append(Problem(
                "`files` comes from a reference: whoever gives that value would choose which files are read "
                "(and, through vector_search, shown)", spec.location, f"{spec.path_text}.files",
                "write the globs in the flow; or, if the value is trusted, add `allow_referenced_files: true` "
                "(the files must still lie in the flow's folder, or `root:`)"))
        if _from_reference(props.get("root")):
            problems.append(Problem("`root` cannot come from a reference: it is what confines `files`",
                                    spec.location, f"{spec.path_text}.root", "write the folder in the flow"))
        return problems

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        from .. import events
        from ..vector import identity
        from ..vector.table import VectorTable, explain_db_error

        p = ctx.props
        vt = VectorTable.from_props(p)
        size, overlap = int(p.get("chunk_size", 1000)), int(p.get("chunk_overlap", 200))
        sources: list[str] = []  # the files read, even those now empty
        if p.get("files") is not None:  # from a reference only with allow_referenced_files (check(), at load)
            base = Path(ctx.run.flow.file).parent
            root = _Root(base, p.get("root"))
            chunks = _file_chunks(p["files"], base, root, size, overlap, sources)
        else:
            chunks = _document_chunks(p["documents"], size, overlap)
        model = identity.model_of(p["embedding"])
        db = await ctx.connection()
        try:
            if p.get("create"):
                await db.enable_vectors()
            info = await identity.table_info(db, vt, cached=False)
            # Before anything is embedded or written: a chunk stored by another model is not "unchanged".
            identity.refuse_other_model(info, vt, model, searching=False)
            stored = await _stored(db, vt, [c[0] for c in chunks], create=bool(p.get("create")))
            # A table from before the model was recorded: its rows are taken as this model's, said aloud.
            unknown_rows = info.exists and info.model is None and bool(
                stored or await db.pool.fetchval(f"SELECT EXISTS (SELECT 1 FROM {vt.sql_table})"))
        except StepFailed:
            raise
        except Exception as e:
            raise explain_db_error(e, vt, db.where) from None
        unrecorded = info.model is None and not info.foreign_comment
        if unknown_rows:
            yield events.Warning(ctx.step_id, _unrecorded_warning(vt, model, info.foreign_comment))
        todo = [c for c in chunks if stored.get(c[0]) != (_md5(c[1]), c[2])]
        total, done = len(chunks), len(chunks) - len(todo)
        yield events.Progress(ctx.step_id, done, total, "unchanged chunks skipped")
        embedder = await embeddings.embedder_for(p["embedding"], ctx)
        batch = int(p["embedding"].get("batch_size") or embeddings.DEFAULT_BATCH)
        created = not p.get("create")  # with create, the first batch's width sizes the new table
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            vectors = await embedder.embed([c[1] for c in part])
            if vectors:
                identity.refuse_other_width(info, vt, model, len(vectors[0]))
            try:
                if not created:
                    for statement in vt.create_sql(len(vectors[0]), p.get("metric", "cosine")):
                        await db.pool.execute(statement)
                    created = True
                if unrecorded and vectors:  # before the first write: no row without its model
                    unrecorded = False
                    if not await identity.record(db, vt, model, len(vectors[0])):
                        yield events.Warning(ctx.step_id, _cannot_record_warning(vt))
                async with db.pool.acquire() as conn, conn.transaction():
                    await conn.executemany(vt.upsert_sql(), [(c[0], c[1], c[2], v) for c, v in zip(part, vectors)])
            except Exception as e:
                raise explain_db_error(e, vt, db.where) from None
            done += len(part)
            yield events.Progress(ctx.step_id, done, total, "embedded and upserted")
        if unrecorded and info.exists:  # nothing to embed: the table is taken as this model's from now on
            try:
                width = info.width if info.width and info.width > 0 else model.dimensions
                if not await identity.record(db, vt, model, width):
                    yield events.Warning(ctx.step_id, _cannot_record_warning(vt))
            except Exception as e:
                raise explain_db_error(e, vt, db.where) from None
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


def _unrecorded_warning(vt: VectorTable, model: Any, foreign_comment: bool) -> str:
    why = ("its embedding column has a comment of its own, so the model cannot be recorded there" if foreign_comment
           else "it was filled before flowrunner recorded the model")
    return (f"table '{vt.table}' does not say which embedding model made its rows ({why}): they are taken as "
            f"{model.name}'s. If another model made them, rebuild the table (DROP TABLE {vt.table}, then create: true)")


def _cannot_record_warning(vt: VectorTable) -> str:
    return (f"cannot record the embedding model on table '{vt.table}' (COMMENT ON COLUMN needs the table's owner): "
            "a later change of model will not be detected")


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


def _from_reference(value: Any) -> bool:
    from .. import refs

    if isinstance(value, list):
        return any(_from_reference(v) for v in value)
    return isinstance(value, refs.Template)


_WILDCARDS = frozenset("*?[")


class _Root:
    """The folder a step's files must lie in, symlinks resolved: the flow file's folder unless the
    step's `root:` names another. A served flow must not hand out what else is on the disk."""

    def __init__(self, base: Path, root: str | None) -> None:
        self.path = (base / Path(root).expanduser() if root else base).resolve()
        self.label = f"root: {root}" if root else "the flow file's folder"

    def holds(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.path)

    def refuse(self, what: str) -> StepFailed:
        return StepFailed(f"{what} lies outside {self.label}: a vector_upsert step reads only files inside it",
                          hint="move the files there, or set `root:` on the step to a folder that holds them "
                               "(relative to the flow file, e.g. root: ..)")


def _glob(pattern: str, base: Path, root: _Root) -> list[Path]:
    """The files of one glob. The folders before its first wildcard are checked before anything is
    listed (so `/**/*.md` lists no directory); each match again once its symlinks are resolved."""
    path = Path(pattern).expanduser()
    parts = path.parts
    literal = next((i for i, part in enumerate(parts) if _WILDCARDS & set(part)), len(parts))
    start = (path if path.is_absolute() else base).joinpath(*parts[:literal])
    if not root.holds(start if literal < len(parts) else start.parent):
        raise root.refuse(pattern)
    try:
        if not path.is_absolute():
            matches = list(base.glob(pattern))
        elif literal < len(parts):
            matches = list(start.glob(str(Path(*parts[literal:]))))
        else:
            matches = [path] if path.exists() else []
    except (OSError, ValueError) as e:
        raise StepFailed(f"cannot list files for {pattern!r}: {e}") from None
    out = []
    for match in sorted(matches):
        if not (match.is_file() and match.suffix.lower() in TEXT_SUFFIXES):
            continue
        if not root.holds(match):  # a symlink that leads out, or `..` after a wildcard
            raise root.refuse(str(match.relative_to(base)) if match.is_relative_to(base) else str(match))
        out.append(match)
    return out


def _file_chunks(globs: str | list[str], base: Path, root: _Root, size: int, overlap: int,
                 sources: list[str]) -> list[Chunk]:
    """The chunks of the files the globs match; their paths (as in the ids) are added to `sources`."""
    from ..vector import chunking

    patterns = [globs] if isinstance(globs, str) else list(globs)
    files: list[Path] = []
    for pattern in patterns:
        files.extend(m for m in _glob(pattern, base, root) if m not in files)
    if not files:
        # The flow's folder by name, not its absolute path: through `serve` this message reaches a client.
        raise StepFailed(f"no text or markdown files match {', '.join(patterns)} (relative to the flow file's folder)",
                         hint=f"files are {', '.join(sorted(TEXT_SUFFIXES))}")
    out: list[Chunk] = []
    for file in files:
        source = str(file.relative_to(base)) if file.is_relative_to(base) else str(file)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as e:  # its strerror: str(e) would name the absolute path
            raise StepFailed(f"cannot read {source}: {e.strerror or type(e).__name__}") from None
        except UnicodeDecodeError:
            raise StepFailed(f"cannot read {source}: it is not UTF-8 text", hint="save it as UTF-8") from None
        sources.append(source)
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), None)
        for i, piece in enumerate(chunking.chunk_text(text, size, overlap)):
            meta = {"source": source, "chunk": i, **({"title": title} if title else {})}
            out.append((f"{source}#{i}", piece, meta))
    return out


def _document_chunks(documents: Any, size: int, overlap: int) -> list[Chunk]:
    from ..vector import chunking

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
        pieces = chunking.chunk_text(doc["content"], size, overlap)
        for i, piece in enumerate(pieces):
            out.append((base_id if len(pieces) == 1 else f"{base_id}#{i}", piece, {**meta, "chunk": i}))
    return out
