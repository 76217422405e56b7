"""The chat step's request options: sampling, identification, storage and logprobs fields of OpenAI's
chat completions API, and `extra_body` for the vendor-specific ones. Each is sent only when the flow
sets it (a server that does not know a field never sees it), with the name and shape the openai SDK
sends, so the streaming request (llm/chat_request.py) and the SDK's (stream: false) carry the same body.

`extra_body` is merged into the request as the SDK's `extra_body=` is: its keys go at the top level
of the JSON body. It may not name a field the step has a property for, or one the step always sends
(model, messages, stream, stream_options): two places for one value, one of them silently losing, is
an error at load (and at run time when the mapping comes from a reference)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import Problem, StepFailed

REFERENCE = {"$ref": "#/$defs/reference"}  # steps.base's: plain data here, so llm imports nothing of steps

SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")
ALWAYS_SENT = ("model", "messages", "stream", "stream_options")
_PENALTY = {"type": "number", "minimum": -2, "maximum": 2}
_TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}

# name -> JSON Schema (the value without its reference branch); PROPERTIES below adds the branch.
_VALUES: dict[str, dict[str, Any]] = {
    "top_p": {"type": "number", "minimum": 0, "maximum": 1,
              "description": "nucleus sampling: only the tokens of the top `top_p` probability mass"},
    "seed": {"type": "integer", "minimum": -2**63, "maximum": 2**63 - 1,  # OpenAI's: a 64-bit integer
             "description": "best-effort deterministic sampling"},
    "stop": {"type": ["string", "array"], "minLength": 1, "items": {"type": "string", "minLength": 1}, "minItems": 1,
             "maxItems": 4, "description": "a text, or a list of up to 4, where the model stops (not in the answer)"},
    "presence_penalty": _PENALTY | {"description": "-2..2: positive values favour new topics"},
    "frequency_penalty": _PENALTY | {"description": "-2..2: positive values discourage repeating tokens"},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                   "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100},
                   "description": "token id (as text) -> bias -100..100"},
    "parallel_tool_calls": {"type": "boolean", "description": "let the model call several tools at once"},
    "user": {"type": "string", "description": "an id of the end user (OpenAI now prefers safety_identifier)"},
    "safety_identifier": {"type": "string", "minLength": 1,
                          "description": "a stable id of the end user (hash it) for abuse detection"},
    "metadata": {"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
                 "additionalProperties": {"type": "string", "maxLength": 512},
                 "description": "up to 16 text pairs (keys up to 64 characters, values up to 512), kept with "
                                "a stored completion"},
    "store": {"type": "boolean", "description": "let OpenAI store the completion (evals, distillation)"},
    "service_tier": {"enum": list(SERVICE_TIERS), "description": "the processing tier: " + ", ".join(SERVICE_TIERS)},
    "prediction": {"type": "object", "required": ["type", "content"], "additionalProperties": False,
                   "properties": {"type": {"const": "content"},
                                  "content": {"anyOf": [{"type": "string"},
                                                        {"type": "array", "items": _TEXT_PART, "minItems": 1}]}},
                   "description": "{type: content, content: text}: predicted output, for faster regeneration"},
    "logprobs": {"type": "boolean", "description": "return each token's log probability (the `logprobs` output)"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                     "description": "0..20 most likely tokens at each position, with their logprobs (needs logprobs: true)"},
    "extra_body": {"type": "object",
                   "description": "vendor-specific fields merged into the request body as they are (the SDK's "
                                  "extra_body); not a field the step has a property for"},
}


def _with_reference(schema: dict[str, Any]) -> dict[str, Any]:
    description = schema.get("description")
    plain = {k: v for k, v in schema.items() if k != "description"}
    if list(plain) == ["anyOf"]:  # no anyOf inside an anyOf: editors complete the branches better
        out: dict[str, Any] = {"anyOf": [*plain["anyOf"], REFERENCE]}
    else:
        out = {"anyOf": [plain, REFERENCE]}
    return out | ({"description": description} if description else {})


PROPERTIES: dict[str, dict[str, Any]] = {name: _with_reference(schema) for name, schema in _VALUES.items()}
NAMES = tuple(_VALUES)


def check(spec: Any, flow: Any, step_properties: Iterable[str]) -> list[Problem]:
    """Load-time checks beyond the schema: top_logprobs without logprobs; extra_body naming a field
    the step sets. Values from references are checked again at run time (`add_options`)."""
    from .. import refs

    props, where = spec.props, f"{spec.path_text}"
    source = getattr(flow, "source", None)

    def located(path: tuple[Any, ...], key: bool = False) -> Any:
        return source.location((*spec.path, *path), key=key) if source is not None else spec.location

    problems = []
    logprobs = props.get("logprobs")
    if props.get("top_logprobs") is not None and not isinstance(logprobs, refs.Template) and logprobs is not True:
        problems.append(Problem("top_logprobs needs logprobs: true", located(("top_logprobs",)),
                                f"{where}.top_logprobs", "add `logprobs: true` to the step"))
    extra = props.get("extra_body")
    if isinstance(extra, Mapping):
        reserved = set(step_properties) | set(ALWAYS_SENT)
        for key in extra:
            if key in reserved:
                problems.append(Problem(_reserved_message(key), located(("extra_body", key), key=True),
                                        f"{where}.extra_body.{key}", _reserved_hint(key, step_properties)))
    return problems


def _reserved_message(key: str) -> str:
    return f"extra_body names '{key}', which the step sets itself: the two would disagree"


def _reserved_hint(key: str, step_properties: Iterable[str]) -> str:
    if key in step_properties:
        return f"set it with the step's own `{key}:` property"
    return f"flowrunner always sends `{key}`: remove it from extra_body"


def add_options(request: dict[str, Any], props: Mapping[str, Any], spec: Any,
                step_properties: Iterable[str]) -> bool:
    """Put the options the step sets into `request` (extra_body under its own key, merged when the
    body is sent: `wire_body`). True when logprobs were asked for (the stream keeps them then).
    Raises StepFailed for a value from a reference that does not fit."""
    from .. import refs

    for name in NAMES:
        value = props.get(name)
        if value is None:
            continue
        if _has_template(spec.props.get(name), refs.Template):
            _check_value(name, value)  # the engine checked only its type: check what is inside too
        request[name] = value
    if request.get("top_logprobs") is not None and request.get("logprobs") is not True:
        raise StepFailed("top_logprobs needs logprobs: true", hint="add `logprobs: true` to the step")
    extra = request.get("extra_body")
    if extra is not None:
        reserved = set(step_properties) | set(ALWAYS_SENT)
        for key in extra:
            if key in reserved:
                raise StepFailed(_reserved_message(key), hint=_reserved_hint(key, step_properties))
        if not extra:
            del request["extra_body"]
    return request.get("logprobs") is True


def wire_body(request: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of `request`: extra_body's fields merged in at the top level, as the SDK does."""
    extra = request.get("extra_body")
    if extra is None:
        return request
    body = {k: v for k, v in request.items() if k != "extra_body"}
    body.update(extra)
    return body


def _has_template(value: Any, template: type) -> bool:
    if isinstance(value, template):
        return True
    if isinstance(value, Mapping):
        return any(_has_template(v, template) for v in value.values())
    if isinstance(value, list):
        return any(_has_template(v, template) for v in value)
    return False


def _check_value(name: str, value: Any) -> None:
    import jsonschema

    schema = {k: v for k, v in _VALUES[name].items() if k != "description"}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is not None:
        inside = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise StepFailed(f"{name}{inside}: {_short(error)}",
                         hint="a ${...} reference resolved to a value this property does not take")


def _short(error: Any) -> str:
    """jsonschema's message without the whole value it checked (which may be long, or a secret)."""
    rules = {"maxProperties": f"has more than {error.validator_value} keys",
             "maxLength": f"is longer than {error.validator_value} characters",
             "maxItems": f"has more than {error.validator_value} items",
             "minItems": "is empty", "minLength": "is empty",
             "minimum": f"is less than {error.validator_value}", "maximum": f"is more than {error.validator_value}",
             "pattern": f"does not match {error.validator_value}", "type": f"is not of type {error.validator_value}",
             "enum": "is not one of " + ", ".join(map(str, error.validator_value or ()))}
    return rules.get(error.validator, error.message if len(error.message) < 160 else f"breaks the rule {error.validator}")
