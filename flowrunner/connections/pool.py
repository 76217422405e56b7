"""The connections of one run (or one batch): their configs resolved from ${env.X} at the start, each
opened the first time a step asks for it, all closed together on an AsyncExitStack."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from .. import refs, secrets
from ..errors import FlowDefinitionError, FlowRuntimeError, Problem
from ..flow.model import ConnectionSpec, Flow
from .registry import CONNECTION_TYPES


@dataclass(frozen=True)
class ResolvedConnection:
    name: str
    type: str
    config: Mapping[str, Any]
    missing_env: Mapping[str, str] = field(default_factory=dict)  # field -> env var that was not set
    base_dir: str = "."  # the directory of the file that declared it: relative paths start there

    def require(self, key: str, what: str | None = None) -> Any:
        """A config value the opener cannot do without, or an error that says how to provide it."""
        value = self.config.get(key)
        if value not in (None, ""):
            return value
        if key in self.missing_env:
            raise FlowDefinitionError.at(
                f"connection '{self.name}' needs {what or key}: environment variable "
                f"{self.missing_env[key]} is not set",
                path=f"connections.{self.name}.{key}",
                hint=f"export {self.missing_env[key]}=...",
            )
        raise FlowDefinitionError.at(f"connection '{self.name}' needs {what or key}", path=f"connections.{self.name}",
                                     hint=f"add `{key}:` to the connection")


def resolve_connection(spec: ConnectionSpec, env: Mapping[str, str]) -> ResolvedConnection:
    """Replace ${env.X} in a connection's config. A missing variable leaves the field unset: the
    connection type decides, when it is opened, whether it can do without it."""
    ctype = CONNECTION_TYPES[spec.type]
    config: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for key, value in spec.config.items():
        if isinstance(value, refs.Template):
            absent = [r.name for r in value.refs if r.name not in env]
            if absent and value.whole is None:  # "http://${env.HOST}/v1" with HOST unset: never guess
                ref = next(r for r in value.refs if r.name == absent[0])
                where = spec.source.find_in_value((*spec.path, key), ref.text) if spec.source else None
                raise FlowDefinitionError(Problem(f"environment variable {absent[0]} is not set", where,
                                                  f"connections.{spec.name}.{key}", f"export {absent[0]}=..."))
            if absent:
                missing[key] = absent[0]
                continue
            value = refs.resolve(value, refs.Scope({}, {}, {}, env))
        config[key] = value
        # Secret fields whole; and any password inside any field (a URL's user:password@).
        secrets.register(value, whole=key in ctype.secrets)
    base = os.path.dirname(spec.source.file) if spec.source and not spec.source.file.startswith("<") else "."
    return ResolvedConnection(spec.name, spec.type, config, missing, base or ".")


class Connections:
    """Opened lazily and once, even when many steps (or batch items) ask at the same moment."""

    def __init__(self, flow: Flow, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.flow = flow
        self.resolved = {name: resolve_connection(spec, env) for name, spec in flow.connections.items()}
        self._opened: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def get(self, name: str) -> Any:
        if name in self._opened:
            return self._opened[name]
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._opened:
                try:
                    self._opened[name] = await self._open(self.resolved[name])
                except FlowDefinitionError as e:  # point at the connection's line in its file
                    spec = self.flow.connections.get(name)
                    source = (spec.source if spec else None) or self.flow.source
                    raise FlowDefinitionError([
                        replace(p, location=p.location or source.location(tuple(p.path.split("."))))
                        for p in e.problems]) from None
        return self._opened[name]

    async def default_history(self) -> Any:
        """The embedded SQLite history store, for history steps that name no connection."""
        name = "(embedded history)"
        if name not in self.resolved:
            self.resolved[name] = ResolvedConnection(name, "sqlite", {})
        return await self.get(name)

    async def _open(self, conn: ResolvedConnection) -> Any:
        opener = CONNECTION_TYPES[conn.type].opener
        if opener is None:
            raise FlowRuntimeError(Problem(f"connection type '{conn.type}' cannot be opened by this version",
                                           path=f"connections.{conn.name}"))
        module, func = opener.split(":")
        return await getattr(importlib.import_module(module), func)(conn, self._stack)
