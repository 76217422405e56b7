"""Checking a reference's path against the JSON Schema of what it reaches into (a step type says what
an output holds with Step.output_shape): `${steps.answer.json.totl}` is a load error when the schema
lists no `totl`. Only what the schema says for certain is held against a path: a field it does not
list under `properties` (unless it allows others: `additionalProperties` written as true or a schema,
or any `patternProperties`). Whatever it leaves open (no `properties`, an unresolvable `$ref`, a
boolean schema) is not checked."""

from __future__ import annotations

from typing import Any

MAX_NODES = 1000  # a path through a huge or recursive schema stops being checked, never loops


def undeclared(schema: Any, path: tuple[str | int, ...]) -> tuple[int, str, list[str]] | None:
    """(depth, name, the names declared there) for the first part of `path` that `schema` rules out;
    None when the path may exist."""
    nodes = [schema]
    budget = [MAX_NODES]
    for depth, part in enumerate(path):
        expanded: list[dict[str, Any]] = []
        for node in nodes:
            if not _expand(node, schema, expanded, budget):
                return None  # something open or unknown on the way: nothing to hold against the path
        following: list[Any] = []
        known: list[str] = []
        for node in expanded:
            if isinstance(part, int):
                inner = _item(node, part)
                if inner is None:
                    return None
                following.append(inner)
                continue
            props = node.get("properties")
            if not isinstance(props, dict) or _open(node):
                return None
            if part in props:
                following.append(props[part])
            else:
                known += [k for k in props if k not in known]
        if not following:
            return depth, str(part), known
        nodes = following
    return None


def _expand(node: Any, root: Any, out: list[dict[str, Any]], budget: list[int]) -> bool:
    """Append the object schemas `node` stands for ($ref followed, allOf/anyOf/oneOf branches);
    False when it stands for something unknown."""
    budget[0] -= 1
    if budget[0] < 0 or not isinstance(node, dict):
        return False
    ref = node.get("$ref")
    if ref is not None:
        target = resolve(ref, root)
        if target is None or not _expand(target, root, out, budget):
            return False
    branches = [b for key in ("allOf", "anyOf", "oneOf") for b in node.get(key) or () if isinstance(node.get(key), list)]
    structural = {k for k in node if k in ("properties", "items", "prefixItems", "additionalProperties",
                                              "patternProperties")}
    if structural or not (branches or ref is not None or _scalar(node)):
        out.append(node)
    for branch in branches:
        if not _expand(branch, root, out, budget):
            return False
    return True


def resolve(ref: Any, root: Any) -> Any:
    """A local JSON pointer (`#/$defs/item`), or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else ():
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def _scalar(node: dict[str, Any]) -> bool:
    """A schema only for values that have no fields and no items (a nullable object's null branch)."""
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    return bool(kinds) and all(k in ("null", "string", "number", "integer", "boolean") for k in kinds)


def _open(node: dict[str, Any]) -> bool:
    extra = node.get("additionalProperties")
    return extra is True or isinstance(extra, dict) or bool(node.get("patternProperties"))


def _item(node: dict[str, Any], index: int) -> Any:
    prefix = node.get("prefixItems")
    if isinstance(prefix, list) and index < len(prefix):
        return prefix[index]
    items = node.get("items")
    if isinstance(items, list):  # draft 7's tuple form
        return items[index] if index < len(items) else None
    return items if isinstance(items, dict) else None
