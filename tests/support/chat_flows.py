"""The one-step chat flow that many CLI tests start from, and the environment its connection reads.

Tests edit the text with str.replace, so the builder keeps the exact lines the tests were written
against: the header, the `llm` connection and a step `answer` asking gpt-4o-mini `inputs.question`."""

from __future__ import annotations

# The connection reads its key and address from the environment (see `openai_env`), with no retries.
LLM_FROM_ENV = ('llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}", '
                'max_retries: 0}')

_TEMPLATE = """
version: 1
name: {name}
inputs:
{inputs}
connections:
  {connection}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
{before}    user_prompt: ${{inputs.question}}
{after}"""


def chat_flow(name: str, *, inputs: str = "  question: {type: string}", connection: str = LLM_FROM_ENV,
              before: str = "", after: str = "") -> str:
    """The flow's YAML. `inputs`: the lines under `inputs:` (indented); `before` / `after`: lines of the
    step `answer` ahead of / after its user_prompt (each ending in a newline); `after` may go on with
    more steps and the outputs."""
    return _TEMPLATE.format(name=name, inputs=inputs, connection=connection, before=before, after=after)


def openai_env(llm, api_key: str = "sk-test-key") -> dict[str, str]:
    """What LLM_FROM_ENV reads: the test server's address and a key."""
    return {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": api_key}
