"""The chat step's request options and images, through the real CLI against the local OpenAI-protocol
server: each option's request body is compared with the body the openai SDK sends for the same call to
the same server; out-of-range values are located errors; logprobs come back as an output; images are
sent as the SDK's content parts (files as data URLs, confined to the flow's folder); `serve` passes a
client's image parts to a flow that takes images."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import run_cli
from tests.support.fixtures import Reply
from tests.support.jsonlines import json_lines

FLOW = """
version: 1
name: options
inputs:
  question: {{type: string}}
{inputs}
connections:
  llm: {{type: openai, api_key: "${{env.TEST_OPENAI_KEY}}", base_url: "${{env.TEST_OPENAI_BASE_URL}}", max_retries: 0}}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    system_prompt: Be brief.
    user_prompt: ${{inputs.question}}
{step}
"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(40))
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(30))


def flow_text(step: str = "", inputs: str = "") -> str:
    return FLOW.format(step="\n".join("    " + line for line in step.strip("\n").splitlines()), inputs=inputs)


@pytest.fixture
def run_flow(llm, write_flow):
    """run_flow(step_yaml, *inputs, inputs_yaml=...): the flow run by the CLI, events on stdout."""

    def run(step: str = "", *inputs: str, inputs_yaml: str = "", env: dict | None = None):
        flow = write_flow(flow_text(step, inputs_yaml))
        full_env = {"TEST_OPENAI_KEY": "sk-test", "TEST_OPENAI_BASE_URL": llm.base_url, **(env or {})}
        args = ["-i", "question=hi"]
        for given in inputs:  # name=value inputs, and command-line options as they are
            args += [given] if given.startswith("--") or args[-1] in ("--record", "--replay") else ["-i", given]
        return run_cli("run", str(flow), *args, "--sink", "jsonl:-", env=full_env)

    return run


def sdk_body(llm, messages: list[dict[str, Any]] = MESSAGES, **options: Any) -> dict[str, Any]:
    """The body the openai SDK sends for the same streaming call to the same server."""
    client = openai.OpenAI(base_url=llm.base_url, api_key="sk-test", max_retries=0)
    with client:
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, temperature=0.7,
                                                stream=True, stream_options={"include_usage": True}, **options)
        for _chunk in stream:
            pass
    return llm.chat_requests[-1].json


def outputs(out) -> dict[str, Any]:
    return next(e for e in json_lines(out.stdout) if e["event"] == "step_finished" and e["step"] == "answer")["outputs"]


# Each option as a flow writes it, and as the SDK's create() takes it.
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "top_p": ("top_p: 0.25", {"top_p": 0.25}),
    "seed": ("seed: 42", {"seed": 42}),
    "stop (text)": ("stop: END", {"stop": "END"}),
    "stop (list)": ("stop: [\"\\n\\n\", END, '###', x]", {"stop": ["\n\n", "END", "###", "x"]}),
    "presence_penalty": ("presence_penalty: -1.5", {"presence_penalty": -1.5}),
    "frequency_penalty": ("frequency_penalty: 2", {"frequency_penalty": 2}),
    "logit_bias": ("logit_bias: {\"50256\": -100, \"1734\": 7}", {"logit_bias": {"50256": -100, "1734": 7}}),
    "parallel_tool_calls": ("parallel_tool_calls: false", {"parallel_tool_calls": False}),
    "user": ("user: user-1234", {"user": "user-1234"}),
    "safety_identifier": ("safety_identifier: 9f86d081884c7d65", {"safety_identifier": "9f86d081884c7d65"}),
    "metadata": ("metadata: {team: docs, run: nightly}", {"metadata": {"team": "docs", "run": "nightly"}}),
    "store": ("store: true", {"store": True}),
    "service_tier": ("service_tier: flex", {"service_tier": "flex"}),
    "prediction": ("prediction: {type: content, content: \"def f(): return 1\"}",
                   {"prediction": {"type": "content", "content": "def f(): return 1"}}),
    "logprobs": ("logprobs: true\ntop_logprobs: 3", {"logprobs": True, "top_logprobs": 3}),
    "top_logprobs 0": ("logprobs: true\ntop_logprobs: 0", {"logprobs": True, "top_logprobs": 0}),
    "extra_body": ("extra_body: {top_k: 40, chat_template_kwargs: {enable_thinking: false}}",
                   {"extra_body": {"top_k": 40, "chat_template_kwargs": {"enable_thinking": False}}}),
}


@pytest.mark.parametrize("name", OPTIONS, ids=list(OPTIONS))
def test_each_option_sends_the_body_the_sdk_sends(run_flow, llm, name: str) -> None:
    step, sdk_options = OPTIONS[name]
    out = run_flow(step)
    assert out.returncode == 0, out.stderr
    ours = llm.chat_requests[-1].json
    assert ours == sdk_body(llm, **sdk_options)
    for key, value in sdk_options.items():  # the values themselves, not only the same as the SDK's
        if key == "extra_body":
            assert {k: ours[k] for k in value} == value and "extra_body" not in ours
        else:
            assert ours[key] == value


def test_options_are_sent_only_when_set(run_flow, llm) -> None:
    assert run_flow().returncode == 0
    body = llm.chat_requests[-1].json
    assert set(body) == {"model", "messages", "temperature", "stream", "stream_options"}
    assert body == sdk_body(llm)


def test_all_options_together_on_azure_match_the_sdk(llm, write_flow) -> None:
    steps = "\n".join(step for step, _ in OPTIONS.values() if not step.startswith(("stop: [", "logprobs: true\ntop_logprobs: 0")))
    flow = write_flow(FLOW.format(inputs="", step="\n".join("    " + s for s in steps.splitlines())).replace(
        'llm: {type: openai, api_key: "${env.TEST_OPENAI_KEY}", base_url: "${env.TEST_OPENAI_BASE_URL}", max_retries: 0}',
        'llm: {type: azure_openai, endpoint: "${env.AZ_ENDPOINT}", api_key: "${env.AZ_KEY}", deployment: dep-1}'
    ).replace("    model: gpt-4o-mini\n", ""))
    out = run_cli("run", str(flow), "-i", "question=hi", env={"AZ_ENDPOINT": llm.azure_endpoint, "AZ_KEY": "az-k"})
    assert out.returncode == 0, out.stderr
    ours = llm.chat_requests[-1]
    sdk_options: dict[str, Any] = {}
    for step, options in OPTIONS.values():
        if not step.startswith(("stop: [", "logprobs: true\ntop_logprobs: 0")):
            sdk_options.update(options)
    client = openai.AzureOpenAI(azure_endpoint=llm.azure_endpoint, api_key="az-k", api_version="2024-10-21",
                                max_retries=0)
    with client:
        for _chunk in client.chat.completions.create(model="dep-1", messages=MESSAGES, temperature=0.7, stream=True,
                                                     stream_options={"include_usage": True}, **sdk_options):
            pass
    sdk = llm.chat_requests[-1]
    assert ours.path == sdk.path == "/openai/deployments/dep-1/chat/completions" and ours.query == sdk.query
    assert ours.json == sdk.json and ours.json["top_k"] == 40 and ours.json["seed"] == 42


def test_options_from_references_are_sent_and_checked(run_flow, llm) -> None:
    step = "seed: ${inputs.seed}\nmetadata: ${inputs.meta}\nstop: ${inputs.stop}"
    inputs = "  seed: {type: integer}\n  meta: {type: object}\n  stop: {type: array}"
    out = run_flow(step, "seed=7", 'meta={"team": "docs"}', 'stop=["x", "y"]', inputs_yaml=inputs)
    assert out.returncode == 0, out.stderr
    assert llm.chat_requests[-1].json == sdk_body(llm, seed=7, metadata={"team": "docs"}, stop=["x", "y"])
    requests = len(llm.chat_requests)
    out = run_flow(step, "seed=7", 'meta={"team": 5}', 'stop=["x"]', inputs_yaml=inputs)
    assert out.returncode == 1
    assert "metadata.team: is not of type string" in out.stderr and "Traceback" not in out.stderr
    out = run_flow(step, "seed=7", "meta={}", 'stop=["a", "b", "c", "d", "e"]', inputs_yaml=inputs)
    assert out.returncode == 1 and "stop: " in out.stderr and "4" in out.stderr
    assert len(llm.chat_requests) == requests  # neither was sent


def test_dry_run_shows_the_options_and_a_replay_compares_them(run_flow, llm, tmp_path: Path) -> None:
    inputs = "  seed: {type: integer}"
    out = run_flow("seed: ${inputs.seed}\nextra_body: {top_k: 5}", "seed=1", "--dry-run", inputs_yaml=inputs)
    assert out.returncode == 0, out.stderr
    shown = json.loads("".join(e["text"] for e in json_lines(out.stdout) if e["event"] == "text"))["request"]
    # the body as sent: extra_body's fields at the top level, and the stream fields
    assert shown["seed"] == 1 and shown["top_k"] == 5 and "extra_body" not in shown and llm.chat_requests == []
    assert shown["stream"] is True and shown["stream_options"] == {"include_usage": True}
    tape = tmp_path / "tape.jsonl"
    assert run_flow("seed: ${inputs.seed}", "seed=1", "--record", str(tape), inputs_yaml=inputs).returncode == 0
    assert run_flow("seed: ${inputs.seed}", "seed=1", "--replay", str(tape), inputs_yaml=inputs).returncode == 0
    out = run_flow("seed: ${inputs.seed}", "seed=2", "--replay", str(tape), inputs_yaml=inputs)
    assert out.returncode == 1 and "replay mismatch" in out.stderr and "seed" in out.stderr


# --- located errors at load time --------------------------------------------------------------

BAD = {
    "top_p: 1.5": "steps[0].top_p: 1.5 is greater than the maximum of 1",
    "temperature: 0.2\nseed: 1.5": "steps[0].seed: expected an integer or a ${...} reference, got a number 1.5",
    "seed: 9223372036854775808": "steps[0].seed: 9223372036854775808 is greater than the maximum of 9223372036854775807",
    "stop: [a, b, c, d, e]": "steps[0].stop: has 5 items, at most 4 allowed",
    "presence_penalty: -2.5": "steps[0].presence_penalty: -2.5 is less than the minimum of -2",
    "frequency_penalty: 3": "steps[0].frequency_penalty: 3 is greater than the maximum of 2",
    "logit_bias: {\"50256\": -101}": "steps[0].logit_bias.50256: must be ≥ -100, got -101",
    "logit_bias: {hello: 1}": "steps[0].logit_bias.hello: the key 'hello' does not match ^[0-9]+$",
    "metadata: {k: 5}": "steps[0].metadata.k: expected a string, got an integer 5",
    "metadata: {k: " + "v" * 513 + "}": "steps[0].metadata.k: is 513 characters long, at most 512 allowed",
    "metadata: {" + "k" * 65 + ": v}": "steps[0].metadata." + "k" * 65 + ": the key 'kkk",  # and is longer than 64
    "metadata: {" + ", ".join(f"k{i}: v" for i in range(17)) + "}": "steps[0].metadata: has 17 keys, at most 16 allowed",
    "service_tier: flexible": "steps[0].service_tier: 'flexible' is not one of: auto, default, flex, scale, priority",
    "prediction: {type: text, content: x}": "steps[0].prediction",
    "logprobs: true\ntop_logprobs: 21": "steps[0].top_logprobs: 21 is greater than the maximum of 20",
    "top_logprobs: 2": "steps[0].top_logprobs: top_logprobs needs logprobs: true",
    "store: yes please": "steps[0].store: expected true or false or a ${...} reference",
    "extra_body: {temperature: 1}": "steps[0].extra_body.temperature: extra_body names 'temperature', which the step "
                                    "sets itself",
    "extra_body: {stream_options: {}}": "steps[0].extra_body.stream_options: extra_body names 'stream_options'",
    "extra_body: [1]": "steps[0].extra_body: expected a mapping or a ${...} reference",
    "images: [../outside.png]": "steps[0].images[0]: ../outside.png lies outside the flow file's folder",
    "images: [{url: x.png, detail: ultra}]": "steps[0].images[0]",
    "images: ['data:text/plain;base64,AAAA']": "steps[0].images[0]: a data URL here must be data:image/<type>;base64,",
    "top_p: .nan": "steps[0].top_p: .nan is not a finite number (JSON has no NaN or infinity)",
    "presence_penalty: 1.0e+999": "steps[0].presence_penalty: 1.0e+999 is not a finite number",
}


@pytest.mark.parametrize("step", BAD, ids=[s.split(":")[0] + str(i) for i, s in enumerate(BAD)])
def test_bad_values_are_located_errors(llm, write_flow, step: str) -> None:
    flow = write_flow(flow_text(step))
    out = run_cli("validate", str(flow))
    assert out.returncode == 1, out.stdout + out.stderr
    key = step.split("\n")[-1].split(":")[0]
    line = flow_text(step).splitlines().index("    " + step.split("\n")[-1]) + 1
    located = [ln for ln in out.stdout.splitlines() + out.stderr.splitlines() if ln.startswith(f"Error: {flow}:{line}:")]
    assert located, out.stdout + out.stderr
    assert BAD[step] in located[0], located[0]
    assert key in located[0] and "Traceback" not in out.stderr
    ran = run_cli("run", str(flow), "-i", "question=hi", env={"TEST_OPENAI_KEY": "k", "TEST_OPENAI_BASE_URL": llm.base_url})
    assert ran.returncode == 2 and llm.chat_requests == []


def test_an_extra_body_key_that_the_step_sets_is_refused_at_run_time_too(run_flow, llm) -> None:
    for key, hint in (("seed", "set it with the step's own `seed:` property"),
                      ("messages", "flowrunner always sends `messages`: remove it from extra_body")):
        out = run_flow("extra_body: ${inputs.extra}", f'extra={{"{key}": 1, "top_k": 3}}',
                       inputs_yaml="  extra: {type: object}")
        assert out.returncode == 1
        assert f"failed: extra_body names '{key}', which the step sets itself" in out.stderr
        assert hint in out.stderr and llm.chat_requests == []


def test_a_value_no_json_can_carry_is_refused_before_any_request(run_flow, llm) -> None:
    for given in ('extra={"top_k": NaN}', 'extra={"top_k": [1e999]}'):
        out = run_flow("extra_body: ${inputs.extra}", given, inputs_yaml="  extra: {type: object}")
        assert out.returncode == 2, out.stderr
        assert "input 'extra': the value holds a number that is not finite (NaN or infinity)" in out.stderr
    assert llm.chat_requests == [] and "internal error" not in out.stderr and "unexpected error" not in out.stderr


# --- logprobs ------------------------------------------------------------------------------------

def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]}


def _logprobs_stream(path: Path) -> Path:
    """A stream as OpenAI sends it with logprobs: each content chunk carries its tokens' logprobs."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}]
    for piece in (["Hel", "lo"], [" world"]):
        chunks.append({**head, "choices": [{"index": 0, "delta": {"content": "".join(piece)},
                                            "logprobs": {"content": [_token(t, -0.5 * len(t)) for t in piece],
                                                         "refusal": None}, "finish_reason": None}]})
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    path.write_text("".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")
    return path


def test_logprobs_are_kept_as_an_output(run_flow, llm, tmp_path: Path) -> None:
    stream = _logprobs_stream(tmp_path / "logprobs.sse")
    llm.script(Reply.from_recording(stream))
    out = run_flow("logprobs: true\ntop_logprobs: 1")
    assert out.returncode == 0, out.stderr
    got = outputs(out)
    assert got["text"] == "Hello world"
    assert [t["token"] for t in got["logprobs"]] == ["Hel", "lo", " world"]
    assert got["logprobs"][2] == _token(" world", -3.0)
    llm.script(Reply.from_recording(stream))
    out = run_flow()  # not asked for: not kept, even when the server sends them
    assert out.returncode == 0 and outputs(out)["logprobs"] is None and outputs(out)["text"] == "Hello world"


def test_a_reference_to_logprobs_not_asked_for_reads_null(llm, write_flow) -> None:
    flow = write_flow(flow_text("") + "outputs:\n  lp: ${steps.answer.logprobs[0].token}\n")
    out = run_cli("run", str(flow), "-i", "question=hi", "--output", "json",
                  env={"TEST_OPENAI_KEY": "k", "TEST_OPENAI_BASE_URL": llm.base_url})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"lp": None}
    assert "is null: step 'answer' returned no logprobs" in out.stderr


# --- images ----------------------------------------------------------------------------------------

def _with_images(*images: dict[str, Any]) -> list[dict[str, Any]]:
    return [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "hi"}, *images]}]


def test_image_urls_are_content_parts_as_the_sdk_sends_them(run_flow, llm) -> None:
    url = "https://example.com/cat.png"
    out = run_flow(f"images: [{url}, {{url: 'data:image/gif;base64,R0lGOD', detail: low}}]")
    assert out.returncode == 0, out.stderr
    ours = llm.chat_requests[-1].json
    expected = _with_images({"type": "image_url", "image_url": {"url": url}},
                            {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGOD", "detail": "low"}})
    assert ours["messages"] == expected
    assert ours == sdk_body(llm, messages=expected)


def test_image_files_become_data_urls_of_their_type(run_flow, llm, tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "chart.png").write_bytes(PNG)
    (tmp_path / "photo.png").write_bytes(JPEG)  # named .png, but a JPEG: the bytes say which
    out = run_flow("images: [pics/chart.png, {url: photo.png, detail: high}]")
    assert out.returncode == 0, out.stderr
    content = llm.chat_requests[-1].json["messages"][-1]["content"]
    assert content[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    assert content[2]["image_url"] == {"url": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(), "detail": "high"}
    assert llm.chat_requests[-1].json == sdk_body(llm, messages=[MESSAGES[0], {"role": "user", "content": content}])


def test_dry_run_shows_an_image_files_data_url_cut_short(run_flow, llm, tmp_path: Path) -> None:
    photo = PNG + bytes(300_000)  # a photo's worth of base64 would flood the terminal
    (tmp_path / "photo.png").write_bytes(photo)
    out = run_flow("images: [photo.png, 'data:image/gif;base64,R0lGOD']", "--dry-run")
    assert out.returncode == 0, out.stderr
    shown = json.loads("".join(e["text"] for e in json_lines(out.stdout) if e["event"] == "text"))["request"]
    first, second = (part["image_url"]["url"] for part in shown["messages"][-1]["content"][1:])
    encoded = base64.b64encode(photo).decode()
    assert first == f"data:image/png;base64,{encoded[:40]}... ({len(encoded) * 3 // 4:,} bytes)"
    assert second == "data:image/gif;base64,R0lGOD"  # a short one is shown whole
    assert len(out.stdout) < 10_000 and llm.chat_requests == []


def test_an_image_file_over_the_limit_is_a_clear_error(run_flow, llm, tmp_path: Path) -> None:
    with open(tmp_path / "huge.png", "wb") as f:
        f.write(PNG)
        f.truncate(20 * 1024 * 1024 + 1)
    out = run_flow("images: [huge.png]")
    assert out.returncode == 1
    assert "images[0]: 'huge.png' is larger than 20 MiB, the most an image may be" in out.stderr
    assert llm.chat_requests == [] and "Traceback" not in out.stderr


def test_a_file_that_is_not_an_image_or_missing_is_an_error(run_flow, llm, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("just text")
    out = run_flow("images: [notes.png]")
    assert out.returncode == 1 and "'notes.png' is not a PNG, JPEG, GIF or WebP image" in out.stderr
    out = run_flow("images: [gone.png]")  # written in the flow: found missing when it is loaded (exit 2)
    assert out.returncode == 2 and "images[0]: the image file gone.png does not exist" in out.stderr, out.stderr
    assert llm.chat_requests == []


def test_image_files_outside_the_flows_folder_are_refused(run_flow, llm, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-secret.png"
    outside.write_bytes(PNG)
    (tmp_path / "link.png").symlink_to(outside)  # a symlink inside that leads out
    try:
        out = run_flow("images: [link.png]")
        assert out.returncode == 2 and "steps[0].images[0]: link.png lies outside the flow file's folder" in out.stderr
        inputs = "  pics: {type: array}"
        out = run_flow("images: ${inputs.pics}\nallow_referenced_files: true", f'pics=["../{outside.name}"]',
                       inputs_yaml=inputs)
        assert out.returncode == 1 and "lies outside the flow file's folder" in out.stderr
        assert str(outside) not in out.stderr  # never the absolute path: through serve it reaches a client
    finally:
        outside.unlink()
    assert llm.chat_requests == []


def test_a_file_named_by_a_reference_is_read_only_when_allowed(run_flow, llm, tmp_path: Path) -> None:
    (tmp_path / "chart.png").write_bytes(PNG)
    inputs = "  pics: {type: array}"
    out = run_flow("images: ${inputs.pics}", 'pics=["chart.png"]', inputs_yaml=inputs)
    assert out.returncode == 1
    assert "images[0]: 'chart.png' is not an https: or data: URL" in out.stderr and "allow_referenced_files" in out.stderr
    assert llm.chat_requests == []
    out = run_flow("images: ${inputs.pics}\nallow_referenced_files: true", 'pics=["chart.png"]', inputs_yaml=inputs)
    assert out.returncode == 0, out.stderr
    assert llm.chat_requests[-1].json["messages"][-1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    out = run_flow("images: ${inputs.pics}", 'pics=["https://example.com/a.webp"]', inputs_yaml=inputs)
    assert out.returncode == 0, out.stderr
    assert llm.chat_requests[-1].json["messages"][-1]["content"][1] == {
        "type": "image_url", "image_url": {"url": "https://example.com/a.webp"}}


def test_history_may_carry_content_parts(run_flow, llm) -> None:
    parts = [{"type": "text", "text": "and this one?"},
             {"type": "image_url", "image_url": {"url": "https://example.com/1.png"}}]
    step = f"history: {json.dumps([{'role': 'user', 'content': parts}, {'role': 'assistant', 'content': 'A cat.'}])}"
    out = run_flow(step)
    assert out.returncode == 0, out.stderr
    messages = llm.chat_requests[-1].json["messages"]
    assert messages[1] == {"role": "user", "content": parts} and messages[2]["content"] == "A cat."


# --- serve --------------------------------------------------------------------------------------

IMAGES_FLOW = """
version: 1
name: vision
inputs:
  question: {type: string}
  images: {type: array, default: []}
connections:
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}"}
steps:
  - id: answer
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: ${inputs.question}
    images: ${inputs.images}
"""


@pytest.fixture
def vision(openai_server, tmp_path):
    from tests.test_serve import Server

    flow = tmp_path / "vision.yaml"
    flow.write_text(IMAGES_FLOW, encoding="utf-8")
    server = Server(flow, openai_server.base_url)
    yield server
    server.stop()


def test_serve_passes_a_clients_image_parts_to_the_flow(vision, llm) -> None:
    client = vision.client()
    earlier = [{"type": "text", "text": "first picture"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    message = [{"type": "text", "text": "What is in this image?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]
    stream = client.chat.completions.create(model=vision.name, stream=True, messages=[
        {"role": "user", "content": earlier}, {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": message}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from the flowrunner test server."
    sent = llm.chat_requests[-1].json["messages"]
    assert sent == [{"role": "user", "content": earlier}, {"role": "assistant", "content": "A chart."},
                    {"role": "user", "content": message}]
    reply = client.chat.completions.create(model=vision.name, messages=[{"role": "user", "content": "no image"}])
    assert reply.choices[0].message.content == "Hello from the flowrunner test server."
    assert llm.chat_requests[-1].json["messages"] == [{"role": "user", "content": "no image"}]


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "chart.png", "data:text/plain;base64,aGk="])
def test_serve_refuses_an_image_that_is_not_a_url(vision, llm, url: str) -> None:
    response = vision.post({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    assert llm.chat_requests == []


def test_readme_commands_for_images_and_options_run(llm, tmp_path: Path) -> None:
    """The README's example of images and options, as printed there (flows/vision.yaml)."""
    import shlex

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("#### Images\n", 1)[1].split("\n### ", 1)[0]
    (line,) = [x for x in section.splitlines() if x.startswith("flowrunner ")]
    args = shlex.split(line)
    assert args == ["flowrunner", "run", "flows/vision.yaml", "-i", "question=What does the chart show?"]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    out = run_cli(*args[1:], env=env)
    assert out.returncode == 0, out.stderr
    body = llm.chat_requests[-1].json
    content = body["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "What does the chart show?"}
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["seed"] == 7 and body["metadata"] == {"flow": "vision"}
