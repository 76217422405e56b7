"""`vector_search`: the passages of a pgvector table nearest to a query, best first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import Problem, StepFailed
from ..vector import embeddings
from ..vector.properties import METRICS, SCHEMA_FRAGMENT
from .base import Outputs, Step, ref_or

if TYPE_CHECKING:
    from .context import StepContext
    from ..events import Event
    from ..flow.model import StepSpec


class VectorSearchStep(Step):
    type_name = "vector_search"
    summary = "Finds the rows of a pgvector table nearest to a query (RAG retrieval), best first."
    connection_types = ("postgres",)
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        **SCHEMA_FRAGMENT,
        "query": {"type": "string", "description": "text to embed and search for"},
        "vector": ref_or({"type": "array", "items": {"type": "number"}, "minItems": 1}) | {
            "description": "search with this vector instead of embedding `query`"},
        "embedding": embeddings.SCHEMA,
        "top_k": ref_or({"type": "integer", "minimum": 1, "maximum": 1000}) | {"default": 5},
        "metric": {"enum": list(METRICS), "default": "cosine",
                   "description": "cosine | l2 | inner_product; use the metric the table's index was built for"},
        "min_score": ref_or({"type": "number"}) | {
            "description": "cosine: similarity (1 - distance) >= min_score; inner_product: inner product >= min_score"},
        "max_distance": ref_or({"type": "number", "minimum": 0}) | {"description": "l2: distance <= max_distance"},
        "filter": ref_or({"type": "object"}) | {"description": "metadata must contain these key/values (jsonb @>)"},
    }
    required = ("connection", "table")
    outputs = {"passages": "[{id, content, score, metadata}], best first", "count": "how many passages"}
    result_default = "passages"
    result_output = "passages"
    example = """\
- id: retrieve
  type: vector_search
  connection: docs
  table: documents
  query: ${inputs.question}
  embedding: {connection: llm, model: text-embedding-3-small}
  top_k: 5
  min_score: 0.3
"""

    @classmethod
    def connections_used(cls, spec: StepSpec, run: Any) -> list[str]:
        return [*super().connections_used(spec, run), *embeddings.connections_used(spec.props.get("embedding"), run)]

    @classmethod
    def check(cls, spec: StepSpec, flow: Any) -> list[Problem]:
        props, path = spec.props, f"{spec.path_text}"
        problems = []
        if ("query" in props) == ("vector" in props):
            problems.append(Problem("give exactly one of `query` (text to embed) or `vector`", spec.location, path))
        if "query" in props and "embedding" not in props:
            problems.append(Problem("`query` needs `embedding:` to turn it into a vector", spec.location, path,
                                    "e.g. embedding: {connection: llm, model: text-embedding-3-small}"))
        if "embedding" in props and isinstance(props["embedding"], dict):
            problems += embeddings.check(props["embedding"], flow.connections, spec)
        metric = props.get("metric", "cosine")
        if metric == "l2" and "min_score" in props:
            problems.append(Problem("with metric l2 the score is a distance (lower is better)", spec.location,
                                    f"{path}.min_score", "use max_distance instead"))
        if metric != "l2" and "max_distance" in props:
            problems.append(Problem(f"max_distance is for metric l2; with {metric} use min_score", spec.location,
                                    f"{path}.max_distance"))
        return problems

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        from ..vector import identity
        from ..vector.table import VectorTable, explain_db_error

        p = ctx.props
        vt = VectorTable.from_props(p)
        metric = p.get("metric", "cosine")
        db = await ctx.connection()
        try:  # the table first: a missing table or another model's is an error before any embedding
            # With `query:` the table's model is checked, read afresh (another process may have recorded
            # one since): one catalog query beside an embedding call. `vector:` needs only the table.
            info = await identity.table_info(db, vt, cached=p.get("vector") is not None)
        except Exception as e:
            raise explain_db_error(e, vt, db.where) from None
        identity.check_table(info, vt)
        if p.get("vector") is not None:
            vector = p["vector"]
        else:
            identity.refuse_other_model(info, vt, identity.model_of(p["embedding"]), searching=True)
            text = _text(p["query"])
            embedder = await embeddings.embedder_for(p["embedding"], ctx)
            vector = (await embedder.embed([text]))[0]
        identity.check_width(info, vt, len(vector))
        args: list[Any] = [vector, int(p.get("top_k", 5))]
        filter_param = threshold = None
        if p.get("filter"):
            args.append(p["filter"])
            filter_param = f"${len(args)}"
        if p.get("min_score") is not None:
            args.append(float(p["min_score"]))
            threshold = f"{METRICS[metric][2]} >= ${len(args)}"
        elif p.get("max_distance") is not None:
            args.append(float(p["max_distance"]))
            threshold = f"distance <= ${len(args)}"
        sql = vt.search_sql(metric, filter_param, threshold)
        try:
            rows = await db.pool.fetch(sql, *args)
        except Exception as e:
            raise explain_db_error(e, vt, db.where) from None
        score = _scorer(metric)
        passages = [{"id": r[0], "content": r[1], "score": score(r[3]), "metadata": r[2]} for r in rows]
        yield Outputs({"passages": passages, "count": len(passages)})


def _scorer(metric: str) -> Any:
    if metric == "cosine":
        return lambda d: 1.0 - d
    if metric == "inner_product":
        return lambda d: -d
    return lambda d: d


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StepFailed(f"query must be non-empty text, got {value!r}")
    return value
