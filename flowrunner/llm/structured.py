"""Structured output for the chat step: `response_format` (OpenAI's wire shape) and the `output_schema`
shorthand. The answer streams as any other; when it ends, it is parsed as JSON and checked against
the schema, and the parsed value becomes the step's `json` output (what `result` binds when a schema
is set). An answer that is not JSON, or does not fit, fails the step naming the JSON path and the
rule. With the step's `retry: {attempts: N}` such a failure is re-asked: the step fails with
StepFailed.reask, the rejected answer and the error as two more messages, which the engine's retry
loop hands to the next attempt (StepContext.followup), although the answer has streamed (the
engine repeats no other failure after text); a warning and a newline come first, so the new answer
streams on a line of its own, announced. The re-ask goes to the model that answered (a fallback's).

This module is imported with the step registry (its property schemas), so it imports nothing heavy:
jsonschema only when an answer is checked. Load-time checks live in structured_load."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..steps.context import StepContext

OUTPUT = "json"
OUTPUT_DOC = ("the answer parsed as JSON, checked against the schema (with output_schema or response_format "
              "json_object / json_schema; bound to `result` when a schema is set); null after a refusal")
_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for json_schema.name
_JSON_SCHEMA = {"type": "object", "description": "a JSON Schema (an object)"}
_FIELDS: dict[str, Any] = {  # json_schema's: inside `json_schema:` (OpenAI's shape) or beside `type` (flat)
    "name": {"type": "string", "pattern": _NAME, "description": "letters, digits, '_' and '-', at most 64"},
    "description": {"type": "string"},
    "schema": _JSON_SCHEMA,
    "strict": {"type": ["boolean", "null"]},
}
FLAT = tuple(_FIELDS)  # what the flat shape writes beside `type`
PROPERTIES: dict[str, dict[str, Any]] = {
    "response_format": {
        "type": "object", "additionalProperties": False, "required": ["type"],
        "description": "{type: json_object}, or {type: json_schema, name, schema, strict, description}, or OpenAI's "
                       "nested {type: json_schema, json_schema: {name, schema, strict, description}}; sent in "
                       "OpenAI's (nested) shape, and the answer is then parsed and checked",
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": _FIELDS,
            },
            **_FIELDS,
        },
    },
    "output_schema": {
        "type": "object",
        "description": "a JSON Schema the answer must fit, inline or {file: PATH} (JSON or YAML, relative to the "
                       "flow file's folder); sent as response_format json_schema named after the step",
        "properties": {"file": {"type": "string", "minLength": 1,
                                "description": "the schema file, relative to the flow file's folder"}},
    },
    "strict": {"type": "boolean", "default": True,
               "description": "with output_schema: json_schema.strict (OpenAI then follows the schema exactly, and "
                              "wants every property required and additionalProperties: false)"},
}


def response_format_of(props: Any) -> Any:
    return props.get("response_format")


def wants_json(props: Any) -> bool:
    """The answer is parsed as JSON (output_schema, or response_format json_object / json_schema)."""
    fmt = props.get("response_format")
    return "output_schema" in props or (isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"))


def schema_from_props(props: Any) -> tuple[tuple[str, ...] | None, Any]:
    """Where the schema is written among the props, and its value (None, None: no schema)."""
    if "output_schema" in props:
        return ("output_schema",), props["output_schema"]
    fmt = props.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None, None
    if isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        return ("response_format", "json_schema", "schema"), fmt["json_schema"]["schema"]
    if "schema" in fmt and "json_schema" not in fmt:
        return ("response_format", "schema"), fmt["schema"]
    return None, None


def wire_format(fmt: dict[str, Any]) -> dict[str, Any]:
    """`response_format` as the openai SDK sends it: the flat shape's fields nested under `json_schema`."""
    if fmt.get("type") != "json_schema" or "json_schema" in fmt:
        return dict(fmt)
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in FLAT if k in fmt}}


def result_output(props: Any) -> str:
    """What `result` binds: the parsed answer when a schema is set, else the text."""
    return OUTPUT if schema_from_props(props)[0] is not None else "text"


def declared_schema_value(schema: Any) -> dict[str, Any] | None:
    """An inline schema as written, or None while references are inside (check() reports those)."""
    from ..refs import Template

    def plain(value: Any) -> bool:
        if isinstance(value, Template):
            return False
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return True

    return schema if isinstance(schema, dict) and plain(schema) else None


class Invalid(Exception):
    """An answer that is not JSON, or does not fit the schema: `message` for people, `feedback` for the model."""

    def __init__(self, message: str, feedback: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.feedback, self.hint = message, feedback, hint


class Reask(list):  # type: ignore[type-arg] - a list of messages, plus where the rejected answer came from
    """The messages a re-ask adds (StepContext.followup), and `place`: the model that gave the rejected
    answer (0: the step's own, n: its n-th fallback), which the re-ask goes to (llm/fallback.py)."""

    place = 0


class Format:
    """One chat call's structured output: what to send, and how to check the answer."""

    def __init__(self, response_format: dict[str, Any], schema: dict[str, Any] | None) -> None:
        self.response_format, self.schema = response_format, schema

    def check(self, text: str, finish_reason: str | None) -> Any:
        """The parsed answer, or Invalid."""
        from ..flow.load import IntegerTooLong, read_int
        from ..secrets import shorten

        cut = " (the answer was cut off at max_completion_tokens: raise it)" if finish_reason == "length" else ""
        body = _unfenced(text)
        try:
            value = json.loads(body, parse_int=read_int, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise Invalid(f"the answer is not JSON: {e.msg} at line {e.lineno} column {e.colno}{cut}",
                          f"your answer is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                          _hint(self.schema is not None)) from None
        except (IntegerTooLong, ValueError, RecursionError) as e:
            why = str(e) if isinstance(e, (IntegerTooLong, ValueError)) else "nested too deeply"
            raise Invalid(f"the answer is not JSON this step reads: {shorten(why, 120)}", f"your answer is not "
                          f"valid JSON ({shorten(why, 120)})", _hint(self.schema is not None)) from None
        if self.schema is not None:
            problem = _first_problem(self.schema, value)
            if problem is not None:
                raise Invalid(f"the answer does not fit the schema: {problem}{cut}",
                              f"your answer does not fit the JSON Schema: {problem}", _hint(True))
        return value

    async def finish(self, ctx: StepContext, outputs: dict[str, Any], place: int) -> AsyncIterator[Any]:
        """Checks the finished answer (from model `place`): yields its Outputs with `json`, or raises
        StepFailed, with `reask` set when the step's `retry` has an attempt left for asking again."""
        from ..errors import StepFailed
        from ..events import TextDelta, Warning
        from ..steps.base import Outputs

        text = outputs["text"]
        if not text and (outputs.get("refusal") or outputs.get("tool_calls")):
            yield Outputs({**outputs, OUTPUT: None})  # nothing to parse: the refusal or the calls are the answer
            return
        try:
            value = self.check(text, outputs.get("finish_reason"))
        except Invalid as e:
            failed = {**outputs, OUTPUT: None}
            attempts = ctx.spec.retry.attempts
            if ctx.attempt >= attempts or getattr(ctx.run, "interrupted", False):
                raise StepFailed(e.message, hint=e.hint, outputs=failed) from None
            yield Warning(ctx.step_id, f"{e.message}: asking the model again (retry {ctx.attempt} of {attempts - 1})")
            if text and not text.endswith("\n"):
                yield TextDelta(ctx.step_id, "\n")  # the next answer starts on a line of its own
            raise StepFailed(e.message, hint=e.hint, outputs=failed, retryable=True,
                             reask=reask_messages(ctx.followup, text, e.feedback, place)) from None
        yield Outputs({**outputs, OUTPUT: value})


def reask_messages(followup: list[dict[str, Any]], text: str, feedback: str, place: int) -> Reask:
    """What the next attempt sends after its prompt: the earlier re-asks, the rejected answer, and the error."""
    out = Reask([*followup, {"role": "assistant", "content": text},
                 {"role": "user", "content": f"{feedback}. Reply again with only the corrected JSON."}])
    out.place = place
    return out


def dry_run_outputs(step: Any, ctx: StepContext, outputs: dict[str, Any]) -> dict[str, Any]:
    """--dry-run has no answer: `json` is null, and so is the variable `result` binds; a path inside
    the variable then reads null, as one inside the (optional) `json` output does, so a dry run goes on
    past the later steps that read the answer (the engine's Run.skipped, which a skipped step uses)."""
    skipped = getattr(ctx.run, "skipped", None)
    if isinstance(skipped, set):
        skipped.update(var for var, output in step.bindings(ctx.spec).items() if output == OUTPUT)
    return {**outputs, OUTPUT: None}


def prepare(props: dict[str, Any], ctx: StepContext) -> Format | None:
    """The step's structured output for this run, or None when the answer is plain text."""
    if not wants_json(props):
        return None
    where, schema = schema_from_props(props)
    if where == ("output_schema",):
        if "file" in schema:
            flow_file = ctx.spec.location.file if ctx.spec.location else ctx.run.flow.file  # a sub-flow's own
            schema = _schema_file(flow_file, schema["file"])
        body = {"name": _name(ctx.step_id), "schema": schema, "strict": props.get("strict", True)}
        return Format({"type": "json_schema", "json_schema": body}, schema)
    return Format(wire_format(props["response_format"]), schema)


def _schema_file(flow_file: str, name: str) -> dict[str, Any]:
    from ..errors import FlowDefinitionError, StepFailed
    from .schema_files import read_schema_file, schema_path, shown_name

    try:  # checked at load: this fails only when the file changed since
        data, _ = read_schema_file(schema_path(flow_file, name), shown_name(flow_file, name))
    except FlowDefinitionError as e:
        first = e.problems[0]  # inside the file: located there; else about the file: named as written
        inside = first.location is not None and first.location.line is not None
        raise StepFailed(f"output_schema: {first.format() if inside else f'{name!r}: {first.message}'}",
                         hint="run flowrunner validate") from None
    if not isinstance(data, dict):
        raise StepFailed(f"output_schema: {name} is not a JSON Schema object", hint="run flowrunner validate")
    return data


def _name(step_id: str) -> str:
    return step_id[:64]  # a step id is letters, digits, '_' and '-': it only needs cutting


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_FENCE = r"\A```(?:json)?[ \t]*\r?\n(.*?)\r?\n?```\Z"  # compiled on first use (re caches it)


def _unfenced(text: str) -> str:
    """The JSON of an answer that is one Markdown code block (local models often add the fence)."""
    stripped = text.strip()
    found = re.match(_FENCE, stripped, re.DOTALL | re.IGNORECASE) if stripped.startswith("```") else None
    return found.group(1) if found else stripped


def _hint(schema: bool) -> str:
    what = "or fix the schema" if schema else "or ask for JSON in the prompt"
    return (f"the answer is the step's `text` output; each attempt of the step's `retry` (e.g. `retry: {{attempts: 2}}`) "
            f"asks the model again with the error: give it more attempts, {what}")


def _first_problem(schema: dict[str, Any], value: Any) -> str | None:
    """`$.path: what is wrong` for the most relevant error, or None when `value` fits."""
    from jsonschema.exceptions import best_match

    from ..secrets import shorten

    validator = _validator(json.dumps(schema, sort_keys=True))
    try:
        errors = list(validator.iter_errors(value))
    except RecursionError:
        return "$: nested too deeply to check"
    except Exception as e:  # noqa: BLE001 - a $ref that resolves nowhere (validate reports it at load)
        from ..errors import StepFailed

        raise StepFailed(f"the schema cannot be applied: {shorten(str(e), 200)}",
                         hint="run flowrunner validate on the flow") from None
    if not errors:
        return None
    error = best_match(errors)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{error.json_path}: {shorten(error.message, 200)}{more}"


@lru_cache(maxsize=64)
def _validator(schema_text: str) -> Any:
    """A validator per schema (keyed by its JSON): building one compiles the schema's references."""
    from jsonschema.validators import validator_for

    from ..flow.dialect import validator_class

    schema = json.loads(schema_text)
    cls = validator_for(schema, default=validator_class()) if "$schema" in schema else validator_class()
    return cls(schema)
