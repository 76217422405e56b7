"""Issue 16, the Responses API: `POST /v1/responses` in front of the same flow, streamed and not, through
the real openai SDK (`client.responses.create`, `client.responses.stream`), against `flowrunner serve`
in a child process with the local OpenAI-protocol test server as the flow's model."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx2
import openai
import pytest

from tests.conftest import ROOT
from tests.support.fixtures import Reply
from tests.test_serve import CHAT_FLOW, HISTORY_FLOW, SYSTEM, serve, user  # noqa: F401

USAGE = {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}
STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added"]
CLOSING_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                  "response.completed"]


def test_a_streamed_response_has_openais_events_and_the_sdk_assembles_it(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["Forty", " two", "."], usage=USAGE))
    events = list(server.client().responses.create(model=server.name, input="What is six times seven?", stream=True))
    kinds = [e.type for e in events]
    assert kinds == [*STREAM_EVENTS, *["response.output_text.delta"] * 3, *CLOSING_EVENTS], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Forty two."
    created, done = events[0].response, events[-1].response
    assert created.id == done.id and created.id.startswith("resp_") and created.status == "in_progress"
    assert done.status == "completed" and done.output_text == "Forty two." and done.model == server.name
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (17, 4, 21)
    item = {e.item.id for e in events if e.type.startswith("response.output_item")}
    assert item == {e.item_id for e in events if e.type == "response.output_text.delta"}
    assert llm.chat_requests[-1].body["messages"] == [SYSTEM, *user("What is six times seven?")]


def test_the_sdks_stream_helper_gives_the_final_response(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["Streamed", " whole"]))
    with server.client().responses.stream(model=server.name, input="q") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Streamed", " whole"] and final.output_text == "Streamed whole"


def test_a_plain_response_with_instructions_and_input_items(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text="Paris.", usage=USAGE))
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Capital of Italy?"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Rome."}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And of France?"}]}]
    response = server.client().responses.create(model=server.name, instructions="Be terse.", input=items)
    assert response.status == "completed" and response.output_text == "Paris."
    assert response.usage.total_tokens == 21 and response.instructions == "Be terse."
    # The flow has no history of its own: instructions and the earlier items are its chat step's history.
    assert llm.chat_requests[-1].body["messages"] == [
        SYSTEM, {"role": "system", "content": "Be terse."}, *user("Capital of Italy?"),
        {"role": "assistant", "content": "Rome."}, *user("And of France?")]


def test_previous_response_id_continues_the_conversation_in_the_flows_store(serve, llm) -> None:
    server = serve(HISTORY_FLOW)
    llm.script(Reply(text="a1"), Reply(text="a2"), Reply(text="a3"))
    client = server.client()
    first = client.responses.create(model=server.name, input="q1")
    with client.responses.stream(model=server.name, input="q2", previous_response_id=first.id) as stream:
        second = stream.get_final_response()
    assert second.previous_response_id == first.id and second.output_text == "a2"
    # Stateless: another serve process on the same store (as another worker or replica) goes on from it.
    other = serve(HISTORY_FLOW)
    third = other.client().responses.create(model=other.name, input="q3", previous_response_id=second.id)
    assert third.output_text == "a3"
    seen = [r.body["messages"][1:] for r in llm.chat_requests]
    turn = lambda q, a: [*user(q), {"role": "assistant", "content": a}]  # noqa: E731
    assert seen == [user("q1"), [*turn("q1", "a1"), *user("q2")], [*turn("q1", "a1"), *turn("q2", "a2"), *user("q3")]]
    # A new single-turn input starts a conversation of its own.
    client.responses.create(model=server.name, input="fresh")
    assert llm.chat_requests[-1].body["messages"][1:] == user("fresh")


def test_a_named_conversation_is_continued_by_its_responses(serve, llm) -> None:
    server = serve(HISTORY_FLOW)
    llm.script(Reply(text="a1"), Reply(text="a2"))
    client = server.client()
    first = client.responses.create(model=server.name, input="q1", metadata={"conversation_id": "c-9"})
    client.responses.create(model=server.name, input="q2", previous_response_id=first.id)
    assert llm.chat_requests[-1].body["messages"][1:] == [*user("q1"), {"role": "assistant", "content": "a1"},
                                                         *user("q2")]
    with pytest.raises(openai.BadRequestError, match="name no other conversation_id"):
        client.responses.create(model=server.name, input="q3", previous_response_id=first.id,
                                metadata={"conversation_id": "c-10"})


@pytest.mark.parametrize("previous", ["resp_unknown", "resp_0123456789abcdef01234567YWJj", "x" * 5000])
def test_an_unknown_previous_response_id_is_a_400(serve, llm, previous) -> None:
    server = serve(HISTORY_FLOW)
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().responses.create(model=server.name, input="q", previous_response_id=previous)
    error = caught.value.body
    assert error["code"] == "previous_response_not_found" and error["param"] == "previous_response_id"
    assert "not found" in error["message"] and len(error["message"]) < 400
    assert llm.chat_requests == []


def test_responses_outside_the_store_cannot_be_continued(serve, llm) -> None:
    history, plain = serve(HISTORY_FLOW), serve(CHAT_FLOW)
    unstored = history.client().responses.create(model=history.name, input="q", store=False)
    with pytest.raises(openai.BadRequestError, match="not found: only a response of this flow that was stored"):
        history.client().responses.create(model=history.name, input="q2", previous_response_id=unstored.id)
    answered = plain.client().responses.create(model=plain.name, input="q")
    with pytest.raises(openai.BadRequestError, match="keeps no history"):
        plain.client().responses.create(model=plain.name, input="q2", previous_response_id=answered.id)


BAD = [
    ({}, "input", "'input' must be a string"),
    ({"input": []}, "input", "'input' must be a string"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]",
     "this flow takes no images"),
    ({"input": [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}]}, "input[0].content[0]",
     "only text content parts"),
    ({"input": [{"role": ["user"], "content": "hi"}]}, "input[0].role", "needs a role"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]",
     "only message items"),
    ({"input": [{"role": "assistant", "content": "hi"}]}, "input[0]", "must be the user's"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "needs a role"),
    ({"input": "q", "stream": "yes"}, "stream", "'stream' must be a boolean"),
    ({"input": "q", "previous_response_id": 7}, "previous_response_id", "must be a string"),
    ({"input": "q", "inputs": {"nope": 1}}, "inputs", "nope"),
]


@pytest.mark.parametrize("body,param,message", BAD)
def test_bad_requests_are_400_with_an_openai_error(serve, llm, body, param, message) -> None:
    server = serve(CHAT_FLOW)
    response = httpx2.post(f"{server.url}/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"
    assert llm.chat_requests == []


def test_a_model_failure_before_the_stream_is_an_http_error_the_sdk_raises(serve, llm) -> None:
    server = serve(CHAT_FLOW.replace('base_url: "${env.OPENAI_BASE_URL}"', 'base_url: "${env.OPENAI_BASE_URL}", '
                                     'max_retries: 0'))
    llm.script(Reply(status=429, error="slow down", retry_after=7))
    with pytest.raises(openai.RateLimitError) as caught:
        server.client().responses.create(model=server.name, input="q", stream=True)
    assert caught.value.response.headers["retry-after"] == "7"


def test_a_stream_broken_midway_ends_with_error_and_response_failed(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text=["Half", " of", " it"], disconnect_after=2))
    events = list(server.client().responses.create(model=server.name, input="q", stream=True))
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds, kinds
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message
    assert failed.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-2].message == failed.error.message


def test_a_truncated_answer_is_an_incomplete_response(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(text="cut short", finish_reason="length"), Reply(text="cut again", finish_reason="length"))
    plain = server.client().responses.create(model=server.name, input="q")
    assert plain.status == "incomplete" and plain.incomplete_details.reason == "max_output_tokens"
    assert plain.output_text == "cut short"
    kinds = [e.type for e in server.client().responses.create(model=server.name, input="q", stream=True)]
    assert kinds[-1] == "response.incomplete", kinds


def test_a_refusal_is_a_refusal_part(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    llm.script(Reply(refusal="I can't help with that."), Reply(refusal="I can't help with that."))
    plain = server.client().responses.create(model=server.name, input="q")
    assert [p.type for p in plain.output[0].content] == ["refusal"] and plain.output_text == ""
    events = list(server.client().responses.create(model=server.name, input="q", stream=True))
    assert [e.refusal for e in events if e.type == "response.refusal.done"] == ["I can't help with that."]
    assert [p.type for p in events[-1].response.output[0].content] == ["output_text", "refusal"]


def test_the_readme_example_runs_as_printed(serve, llm) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("#### The Responses API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    server = serve(HISTORY_FLOW)
    llm.script(Reply(text=["pgvector adds", " vector search."]), Reply(text="HNSW and IVFFlat."))
    code = code.replace("http://127.0.0.1:8000/v1", server.url)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "pgvector adds vector search.\nHNSW and IVFFlat.\n", out.stdout
    assert llm.chat_requests[-1].body["messages"][1:3] == [*user("What is pgvector?"),
                                                          {"role": "assistant", "content": "pgvector adds vector search."}]


IMAGES_FLOW = (CHAT_FLOW.replace("name: served-chat", "name: served-vision")
               .replace("  tone: {type: string, default: plain}",
                        "  tone: {type: string, default: plain}\n  images: {type: array, default: []}")
               .replace("    user_prompt: ${inputs.question}", "    user_prompt: ${inputs.question}\n    images: ${inputs.images}"))


def test_input_images_reach_a_flow_that_takes_images_as_image_url_parts_do(serve, llm) -> None:
    server = serve(IMAGES_FLOW)
    earlier = [{"type": "input_text", "text": "first picture"},
               {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}]
    message = [{"type": "input_text", "text": "What is in this image?"},
               {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}]
    response = server.client().responses.create(model=server.name, input=[
        {"role": "user", "content": earlier}, {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": message}])
    assert response.output_text == "Hello from the flowrunner test server."
    image = lambda url, detail: {"type": "image_url", "image_url": {"url": url, "detail": detail}}  # noqa: E731
    assert llm.chat_requests[-1].json["messages"] == [
        SYSTEM, {"role": "user", "content": [{"type": "text", "text": "first picture"},
                                             image("data:image/png;base64,iVBORw0KGgo=", "auto")]},
        {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     image("https://example.com/cat.png", "low")]}]
    only_image = server.client().responses.create(model=server.name, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/dog.png"}]}])
    assert only_image.status == "completed"
    assert llm.chat_requests[-1].json["messages"][-1]["content"][-1] == {
        "type": "image_url", "image_url": {"url": "https://example.com/dog.png"}}


@pytest.mark.parametrize("part,param", [
    ({"type": "input_image", "image_url": "file:///etc/passwd"}, "input[0].content[0].image_url"),
    ({"type": "input_image", "image_url": "/etc/passwd"}, "input[0].content[0].image_url"),
    ({"type": "input_image", "file_id": "file-123"}, "input[0].content[0].file_id"),
    ({"type": "input_image", "image_url": "https://example.com/a.png", "detail": "ultra"},
     "input[0].content[0].detail"),
])
def test_an_input_image_that_is_not_an_image_url_is_a_400(serve, llm, part, param) -> None:
    server = serve(IMAGES_FLOW)
    body = {"input": [{"role": "user", "content": [part]}]}
    response = httpx2.post(f"{server.url}/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert llm.chat_requests == []


def test_the_request_line_of_a_response_names_its_path(serve, llm) -> None:
    server = serve(CHAT_FLOW)
    server.client().responses.create(model=server.name, input="q")
    server.client().chat.completions.create(model=server.name, messages=user("q"))
    server.stop()  # all of its log is in `lines`
    runs = [(r.get("path"), r["status"]) for r in server.events("request") if "run_id" in r]
    assert runs == [("/v1/responses", 200), (None, 200)]  # a chat completion's is the usual path: not named
