"""The registry of step types. A new step type is one module plus one line here.

Custom step types: modules named in FLOWRUNNER_PLUGINS (comma-separated) are imported when the
registry loads; each calls `register(MyStep)`."""

from __future__ import annotations

import importlib
import os

from ..errors import FlowDefinitionError
from .base import Step
from .chat_completion import ChatCompletionStep
from .history_load import HistoryLoadStep
from .history_save import HistorySaveStep
from .parallel import ParallelStep
from .set import SetStep
from .subflow import FlowStep
from .vector_search import VectorSearchStep
from .vector_upsert import VectorUpsertStep

STEP_TYPES: dict[str, type[Step]] = {}
_generation = 0  # counts changes to STEP_TYPES


def register(cls: type[Step]) -> type[Step]:
    """Add a step type (usable as a class decorator)."""
    global _generation
    STEP_TYPES[cls.type_name] = cls
    _generation += 1
    return cls


def generation() -> int:
    """Changes whenever a step type is registered: what is built from the registry (the flow schema,
    its compiled validators) is cached under this number, so a plugin registered later is seen."""
    return _generation


for _cls in (SetStep, ChatCompletionStep, VectorSearchStep, VectorUpsertStep, HistoryLoadStep, HistorySaveStep,
             ParallelStep, FlowStep):
    STEP_TYPES[_cls.type_name] = _cls


def _load_plugins() -> None:
    for name in filter(None, (m.strip() for m in os.environ.get("FLOWRUNNER_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise FlowDefinitionError.at(f"FLOWRUNNER_PLUGINS: cannot import {name!r}: {e}") from None


_load_plugins()
