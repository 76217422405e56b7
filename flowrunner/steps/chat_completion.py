"""`chat_completion`: the seed action "Streaming chat completion" (OpenAI and Azure OpenAI)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import Problem, StepFailed
from ..llm import fallback, images, options, reasoning, structured
from ..llm.replay import calls_model, replays
from ..refs import to_text
from .base import Outputs, Step, ref_or

if TYPE_CHECKING:
    from ..connections.openai import LLMClient
    from .context import StepContext
    from ..events import Event
    from ..flow.model import StepSpec

_MESSAGE = {"type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string"},
                           "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
                               "type": "object", "required": ["type"]}}]}}}  # text, or OpenAI content parts


# What a streamed request adds to the body (usage comes in a last chunk); --dry-run shows the same.
STREAMED = {"stream": True, "stream_options": {"include_usage": True}}


class ChatCompletionStep(Step):
    type_name = "chat_completion"
    summary = "Streams a chat completion from OpenAI or Azure OpenAI; the text reaches the sink as it arrives."
    connection_types = ("openai", "azure_openai")
    properties: ClassVar[dict[str, dict[str, Any]]] = {
        "model": {"type": "string", "description": "model id (openai connections)"},
        "deployment": {"type": "string", "description": "deployment name (azure_openai connections)"},
        "system_prompt": {"type": "string", "description": "first message, role system"},
        "user_prompt": {"type": "string", "description": "the user's message"},
        "history": ref_or({"type": "array", "items": _MESSAGE}) | {
            "description": "{role, content} messages placed between the system and the user message"},
        "context": {"type": ["string", "array", "object"],
                    "description": "text, a list of texts, or a vector_search result (numbered passages)"},
        "prompt_template": {"type": "string", "description": "@@context and @@userPrompt are replaced in one pass"},
        "temperature": reasoning.TEMPERATURE,
        "max_completion_tokens": ref_or({"type": "integer", "minimum": 1}),
        "stream": ref_or({"type": "boolean"}) | {"default": True},
        "tools": ref_or({"type": "array", "items": {"type": "object"}}) | {
            "description": "OpenAI tool definitions; calls are returned as tool_calls"},
        "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"},
                                  {"$ref": "#/$defs/reference"}]},
        "fallback": fallback.FALLBACK_SCHEMA,
        **options.PROPERTIES,
        **images.PROPERTIES,
        **structured.PROPERTIES,
        **reasoning.PROPERTIES,
        "result": {"$ref": "#/$defs/name", "description": "variable that receives the text, or the parsed `json` "
                                                          "when a schema is set (default 'response')"},
    }
    required = ("connection", "user_prompt")
    outputs = {
        "text": "the answer (bound to `result`, default variable `response`, unless a schema is set)",
        "finish_reason": "stop | length | tool_calls | content_filter",
        "usage": "{prompt_tokens, completion_tokens, total_tokens, ...}; null when the server sent none",
        "tool_calls": "[{id, type, name, arguments}] with arguments parsed from JSON",
        "refusal": "the model's refusal text when it refused (a warning, exit 0); otherwise null",
        "model": "the model that answered; null when the server did not say",
        "partial": "true when the stream broke before the end",
        "reasoning": "a reasoning model's thinking (delta.reasoning_content or delta.reasoning); otherwise null",
        structured.OUTPUT: structured.OUTPUT_DOC,
        "connection": "the connection that answered: the step's own, or the fallback's that answered",
        "logprobs": "with logprobs: true, the tokens' [{token, logprob, bytes, top_logprobs}]; otherwise null",
    }
    # A server may send no usage (llama.cpp, Ollama, a dry run or an old recording) and no model name;
    # a reference into them then reads as null with a warning instead of failing a run that succeeded.
    optional_outputs = frozenset({"usage", "refusal", "model", "logprobs", structured.OUTPUT})
    result_default = "response"
    result_output = "text"
    example = """\
- id: answer
  type: chat_completion
  connection: llm
  model: gpt-4o-mini
  system_prompt: You answer from the context. Say so when it does not hold the answer.
  user_prompt: ${inputs.question}
  history: ${history}
  context: ${passages}
  temperature: 0.2
  max_completion_tokens: 800
"""

    @classmethod
    def connections_used(cls, spec: StepSpec, run: Any) -> list[str]:
        if not calls_model(run.llm_mode):
            return []  # dry run, replay: offline
        return [*super().connections_used(spec, run), *fallback.connections_of(spec)]

    @classmethod
    def streams(cls, spec: StepSpec) -> bool:
        return spec.props.get("stream", True) is not False  # a ${...} reference may be true: it counts

    @classmethod
    def bindings(cls, spec: StepSpec) -> dict[str, str]:
        return {str(spec.props.get("result") or cls.result_default): structured.result_output(spec.props)}

    @classmethod
    def declared_outputs(cls, spec: StepSpec) -> tuple[str, ...]:
        wanted = structured.wants_json(spec.props)  # `json` is there only when the answer is parsed
        return tuple(name for name in cls.outputs if wanted or name != structured.OUTPUT)

    @classmethod
    def output_shape(cls, spec: StepSpec, output: str, flow: Any) -> dict[str, Any] | None:
        from ..llm.structured_load import declared_shape

        return declared_shape(spec, flow) if output == structured.OUTPUT else None

    @classmethod
    def check(cls, spec: StepSpec, flow: Any) -> list[Problem]:
        from ..llm import structured_load

        return [*structured_load.check(spec, flow), *options.check(spec, flow, cls.properties),
                *images.check(spec, flow), *cls._check_connection(spec, flow), *fallback.problems(spec, flow)]

    @classmethod
    def _check_connection(cls, spec: StepSpec, flow: Any) -> list[Problem]:
        conn = flow.connections.get(spec.props.get("connection"))
        if conn is None:
            return []
        loc = spec.location
        if conn.type == "openai" and "model" not in spec.props:
            hint = "an openai connection takes `model:`" + (" (deployment is for azure_openai)"
                                                            if "deployment" in spec.props else "")
            return [Problem("missing required property 'model'", loc, f"{spec.path_text}", hint)]
        if conn.type == "azure_openai" and "deployment" not in spec.props and "deployment" not in conn.config:
            return [Problem("missing required property 'deployment'", loc, f"{spec.path_text}",
                            "an azure_openai connection takes `deployment:` (on the step or the connection)")]
        return []

    async def run(self, ctx: StepContext) -> AsyncIterator[Event | Outputs]:
        from ..events import TextDelta, Usage, Warning  # lazily: `validate` never needs events
        from ..llm.prompt import PromptError, build_messages
        from ..llm.stream import StreamError, StreamState

        p = ctx.props
        mode = ctx.run.llm_mode  # None, or a DryRun / Recorder / Replayer (flowrunner.llm.replay)
        kind = mode.kind if mode is not None else None
        conn = ctx.resolved_connection()  # offline, the connection is never opened: no key needed
        model = p.get("model") if conn.type == "openai" else (p.get("deployment") or conn.config.get("deployment"))
        if "history" in p:
            history = p["history"]
        else:  # `serve` / `chat` with a flow that keeps no history: the client's earlier messages
            from ..conversation import default_chat_history

            history = default_chat_history(ctx.run)
        try:
            messages = build_messages(p.get("system_prompt"), history, to_text(p["user_prompt"]),
                                      p.get("context"), p.get("prompt_template"))
        except PromptError as e:
            raise StepFailed(str(e)) from None
        if p.get("images"):
            where = ctx.spec.location.file if ctx.spec.location else ctx.run.flow.file
            images.with_images(messages[-1], await images.image_parts(
                p["images"], ctx.spec.props.get("images"), where, p.get("allow_referenced_files") is True))
        request: dict[str, Any] = {"model": model, "messages": messages}
        reasoning.add_reasoning(request, p, messages)  # temperature (or none), reasoning_effort, developer role
        for key in ("max_completion_tokens", "tools", "tool_choice"):
            if p.get(key) is not None:
                request[key] = p[key]
        fmt = structured.prepare(p, ctx)  # response_format; the answer is parsed and checked when it ends
        if fmt is not None:
            request["response_format"] = fmt.response_format
            messages += ctx.followup  # a re-ask: the rejected answer and what was wrong with it
        logprobs = options.add_options(request, p, ctx.spec, self.properties)
        state = StreamState()
        if logprobs:
            state.logprobs = []  # only then does the stream keep them: other streams pay nothing
        state.connection = p["connection"]
        ctx.partial = lambda: state.outputs(partial=True)
        if kind == "dry-run":
            from ..llm.replay import comparable

            # The body as it would go on the wire (extra_body merged, the stream fields), a data URL cut short.
            streamed = STREAMED if p.get("stream", True) else {"stream": False}
            shown = options.wire_body({**comparable({**request, "messages": images.shortened(messages)}), **streamed})
            yield TextDelta(ctx.step_id, json.dumps({"step": ctx.step_id, "request": shown},
                                                    indent=2, ensure_ascii=False) + "\n")
            state.finish_reason, state.model = "dry_run", model
            outputs = state.outputs(partial=False)
            yield Outputs(structured.dry_run_outputs(self, ctx, outputs) if fmt else outputs)
            return
        if mode is not None and not p.get("stream", True):
            raise StepFailed("--record and --replay work with streaming chat steps (stream: true)")
        ctx.run.chat_messages[ctx.call_key] = messages  # `serve` counts them when the server sends no usage
        try:
            # with `fallback:` the same call goes to each model in turn while they fail before answering
            calls = fallback.answer(self, ctx, request, state, mode) if p.get("fallback") else \
                self._call(ctx, None, request, state, mode)
            async with aclosing(calls) as events:
                async for event in events:
                    yield event
        except StreamError as e:
            raise StepFailed(e.message, hint=e.hint, outputs=state.outputs(partial=True),
                             retryable=e.retryable and not (state.parts or state.reasoning), http_status=e.status,
                             http_headers=e.headers) from None
        if not state.finish_reason:
            raise StepFailed("the stream ended before the model finished (no finish_reason)",
                             hint="the server closed the connection early", outputs=state.outputs(partial=True),
                             retryable=not (state.parts or state.reasoning), http_status=502)  # the model's server broke it off
        if not state.done and p.get("stream", True):
            yield Warning(ctx.step_id, "the stream ended without [DONE]; usage may be missing")
        if state.finish_reason == "content_filter":
            raise StepFailed("the answer was stopped by the content filter (finish_reason: content_filter)",
                             outputs=state.outputs(partial=True))
        if state.finish_reason == "length":
            yield Warning(ctx.step_id, "the answer was cut off at max_completion_tokens (finish_reason: length)")
        if state.refusal:
            # A refusal is a complete answer (OpenAI ends it with finish_reason stop): the step succeeds,
            # and the refusal is its `refusal` output, but it is never silent.
            yield Warning(ctx.step_id, f"the model refused to answer: {''.join(state.refusal)}")
        try:
            calls = state.parsed_tool_calls()
        except StreamError as e:
            raise StepFailed(e.message, outputs=state.outputs(partial=True)) from None
        if state.usage:
            yield Usage(ctx.step_id, state.usage)
        if fmt is not None:  # parsed and checked: its Outputs, or StepFailed (a re-ask with `retry`)
            async with aclosing(fmt.finish(ctx, state.outputs(partial=False, tool_calls=calls), state.place)) as items:
                async for item in items:
                    yield item
            return
        yield Outputs(state.outputs(partial=False, tool_calls=calls))

    async def _call(self, ctx: StepContext, connection: str | None, request: dict[str, Any], state: Any,
                    mode: Any) -> AsyncIterator[Event]:
        """One call to one model (`connection`: None for the step's own): replayed, streamed, or whole."""
        from ..events import ReasoningDelta, TextDelta

        if replays(mode):
            from ..llm.stream import replay_stream

            chunks = mode.take(ctx.step_id, request)
            async with aclosing(replay_stream(chunks, ctx.step_id, state)) as deltas:
                async for delta in deltas:
                    yield delta
        elif ctx.props.get("stream", True):
            llm: LLMClient = await ctx.connection(connection)
            async with aclosing(self._stream(llm, request, state, ctx.step_id, mode)) as deltas:
                async for delta in deltas:
                    yield delta
        else:
            text = await self._complete(await ctx.connection(connection), request, state)
            if state.reasoning:  # the whole reply's thinking, before its answer as a stream has it
                yield ReasoningDelta(ctx.step_id, state.reasoning[0])
            if text:
                yield TextDelta(ctx.step_id, text)

    async def _stream(self, llm: LLMClient, request: dict[str, Any], state: Any, step_id: str,
                      recorder: Any = None) -> AsyncIterator[Event]:
        from ..events import StreamStarted
        from ..llm.chat_request import open_chat_stream
        from ..llm.stream import read_stream

        tap: list[str] | None = [] if recorder is not None else None
        try:
            body = options.wire_body({**request, **STREAMED})
            response = await open_chat_stream(llm, body)
            try:
                yield StreamStarted(step_id)
                async with aclosing(read_stream(response, step_id, state, llm.idle_timeout, tap)) as deltas:
                    async for delta in deltas:
                        yield delta
            finally:
                await response.aclose()
        finally:
            if tap:  # a stream that broke is recorded as it broke: its replay breaks the same way
                recorder.save(step_id, request, tap)

    async def _complete(self, llm: LLMClient, request: dict[str, Any], state: Any) -> str:
        from ..llm.errors import api_error

        import openai

        try:
            reply = await llm.client.chat.completions.create(**request, stream=False)
        except openai.APIError as e:
            raise api_error(e, llm) from None
        state.done, state.model = True, reply.model
        state.usage = reply.usage.model_dump(exclude_none=True) if reply.usage else None
        if reply.choices:
            choice = reply.choices[0]
            state.finish_reason = choice.finish_reason
            message = choice.message
            if message.content:
                state.parts.append(message.content)
            thought = reasoning.message_reasoning(message)
            if thought:
                state.reasoning.append(thought)
            if message.refusal:
                state.refusal.append(message.refusal)
            if state.logprobs is not None and choice.logprobs is not None:
                state.logprobs.extend(t.model_dump() for t in choice.logprobs.content or ())
            for i, call in enumerate(message.tool_calls or []):
                state.add_tool_calls([{"index": i, "id": call.id, "type": call.type,
                                       "function": {"name": call.function.name, "arguments": call.function.arguments}}])
        return state.text
