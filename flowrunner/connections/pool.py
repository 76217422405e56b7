"""The connections of one run (or one batch): their configs resolved from ${env.X} at the start, each
opened the first time a step asks for it, all closed together on an AsyncExitStack."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from .. import refs, secrets, stepclock
from ..errors import FlowDefinitionError, FlowRuntimeError, Location, Problem, StepFailed
from ..flow.model import ConnectionSpec, Flow
from .registry import CONNECTION_TYPES, clean_field, connection_problem


@dataclass(frozen=True)
class ResolvedConnection:
    name: str
    type: str
    config: Mapping[str, Any]
    missing_env: Mapping[str, str] = field(default_factory=dict)  # field -> env var that was not set
    base_dir: str = "."  # the directory of the file that declared it: relative paths start there
    # Fields that put an unset ${env.X} inside longer text ("http://${env.HOST}/v1"): never guessed,
    # so the connection cannot be opened at all.
    unset: tuple[Problem, ...] = ()

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
    """Replace ${env.X} in a connection's config. A missing variable leaves the field unset; which
    of those the connection cannot do without, env_problems() says (before the first step)."""
    ctype = CONNECTION_TYPES[spec.type]
    config: dict[str, Any] = {}
    missing: dict[str, str] = {}
    unset: list[Problem] = []
    for key, value in spec.config.items():
        if isinstance(value, refs.Template):
            absent = [r.name for r in value.refs if r.name not in env]
            if absent and value.whole is None:  # "http://${env.HOST}/v1" with HOST unset: never guess
                unset.append(Problem(f"environment variable {absent[0]} is not set", _where(spec, key, absent[0]),
                                     f"connections.{spec.name}.{key}", f"export {absent[0]}=..."))
                continue
            if absent:
                missing[key] = absent[0]
                continue
            value = refs.resolve(value, refs.Scope({}, {}, {}, env))
        # Secret fields whole; and any password inside any field (a URL's user:password@).
        secrets.register(value, whole=key in ctype.secrets)
        value, refused = clean_field(ctype, key, value)
        if refused:  # e.g. a key with a line break inside: never sent, never shown
            var = _env_name(spec.config[key])
            unset.append(Problem(f"the value{f' of {var}' if var else ''} {refused}", _where(spec, key, var),
                                 f"connections.{spec.name}.{key}", "it is not shown here: it may be a secret"))
            continue
        config[key] = value
    for key, var in ctype.env_defaults.items():  # e.g. OPENAI_API_KEY, as the SDK reads it
        if key not in spec.config:
            if env.get(var):
                secrets.register(env[var], whole=key in ctype.secrets)
                value, refused = clean_field(ctype, key, env[var])
                if refused:
                    unset.append(Problem(f"{key}: the value of {var} {refused}", _where(spec, None, None),
                                         f"connections.{spec.name}", "it is not shown here: it may be a secret"))
                else:
                    config[key] = value
            else:
                missing[key] = var
    base = os.path.dirname(spec.source.file) if spec.source and not spec.source.file.startswith("<") else "."
    return ResolvedConnection(spec.name, spec.type, config, missing, base or ".", tuple(unset))


def _env_name(raw: Any) -> str | None:
    """The variable of a field written as exactly one ${env.X}."""
    whole = raw.whole if isinstance(raw, refs.Template) else None
    return getattr(whole, "name", None)


def env_problems(conn: ResolvedConnection, spec: ConnectionSpec | None) -> list[Problem]:
    """What keeps `conn` from opening that is known before any step runs: an unset ${env.X} in a
    field it cannot do without (or none of a group of alternatives given at all)."""
    ctype = CONNECTION_TYPES[conn.type]
    problems = list(conn.unset)

    def given(key: str) -> bool:
        return conn.config.get(key) not in (None, "")

    for need in ctype.needs:
        unset = [k for k in need.fields if k in conn.missing_env]
        if any(given(k) for k in need.fields) or (need.only_if_given and not unset):
            continue
        what = f"connection '{conn.name}' needs {need.words}"
        if unset:
            var = conn.missing_env[unset[0]]
            others = [conn.missing_env[k] for k in unset[1:]]
            problems.append(Problem(f"{what}: environment variable {var} is not set",
                                    _where(spec, unset[0] if need.at_field else None, var),
                                    f"connections.{conn.name}" + (f".{unset[0]}" if need.at_field else ""),
                                    f"export {var}=..." + "".join(f", or {v}=..." for v in others)))
        else:
            problems.append(Problem(what, _where(spec, None, None), f"connections.{conn.name}",
                                    f"add `{need.fields[0]}:` to the connection"))
    return problems


def _where(spec: ConnectionSpec | None, key: str | None, var: str | None) -> Location | None:
    """The ${env.VAR} in the field `key` of the connection's file, else the connection itself."""
    if spec is None or spec.source is None:
        return None
    if key is not None and key in spec.config:
        return spec.source.find_in_value((*spec.path, key), f"${{env.{var}}}")
    return spec.source.location(spec.path)


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

    def check_env(self, names: Iterable[str]) -> None:
        """Every unset environment variable that the connections `names` need, in one error: called
        before the first step, so a run never stops over one after it has done some work."""
        problems = [p for name in dict.fromkeys(names) if name in self.resolved
                    for p in env_problems(self.resolved[name], self.flow.connections.get(name))]
        if problems:
            raise FlowDefinitionError(sorted(problems, key=lambda p: (p.location.file, p.location.line or 0,
                                                                       p.location.col or 0) if p.location else ("", 0, 0)))

    def check(self, name: object, allowed: tuple[str, ...], user: str, via: str) -> None:
        """A connection name that came through the reference `via`: one the flow declares, of a type
        that `user` takes; otherwise the step fails here, before it asks for the connection."""
        found = connection_problem(name, allowed, {n: c.type for n, c in self.flow.connections.items()}, user)
        if found:
            raise StepFailed(f"{via}: {found[0]}", hint=found[1])

    async def get(self, name: str) -> Any:
        if name in self._opened:
            return self._opened[name]
        with stepclock.paused():  # opening is the run's set-up, not the asking step's work (its timeout)
            return await self._get_new(name)

    async def _get_new(self, name: str) -> Any:
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
        if conn.unset:
            raise FlowDefinitionError(conn.unset)
        opener = CONNECTION_TYPES[conn.type].opener
        if opener is None:
            raise FlowRuntimeError(Problem(f"connection type '{conn.type}' cannot be opened by this version",
                                           path=f"connections.{conn.name}"))
        module, func = opener.split(":")
        return await getattr(importlib.import_module(module), func)(conn, self._stack)
