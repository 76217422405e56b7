"""Structured output in the chat step (output_schema, response_format, re-asking with `retry`) through the real
CLI against the local OpenAI-protocol server, and `validate`'s located errors for bad schemas and for
references to fields the schema does not declare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.chat_flows import LLM_FROM_ENV, chat_flow, openai_env
from tests.support.fixtures import Reply
from tests.support.jsonlines import events

SCHEMA = """\
    output_schema:
      type: object
      properties:
        city: {type: string}
        items:
          type: array
          items:
            type: object
            properties:
              price: {type: number, minimum: 0}
      required: [city, items]
      additionalProperties: false
"""
USES = """\
  - id: show
    type: set
    values: {city: "${steps.answer.json.city}", price: "${response.items[0].price}"}
outputs:
  city: ${steps.answer.json.city}
  price: ${response.items[0].price}
  text: ${steps.answer.text}
"""
GOOD = ['{"city": ', '"Paris", ', '"items": [{"price": ', '3.5}]}']


def run_flow(llm, flow: Path, *args: str, question: str = "Where? Answer in JSON."):
    return run_cli("run", str(flow), "-i", f"question={question}", *args, env=openai_env(llm))


def finished(out, step: str = "answer") -> dict:
    return next(e for e in events(out.stdout) if e["event"] == "step_finished" and e["step"] == step)


def line_col(text: str, needle: str, occurrence: int = 0) -> str:
    """`line:col` (1-based) of `needle` in `text`."""
    index = -1
    for _ in range(occurrence + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    return f"{line}:{index - (text.rfind(chr(10), 0, index) + 1) + 1}"


def test_a_conforming_answer_streams_and_its_fields_are_outputs(llm, write_flow) -> None:
    llm.script(Reply(text=GOOD))
    flow = write_flow(chat_flow("structured", before=SCHEMA, after=USES))
    out = run_flow(llm, flow, "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    assert [e["text"] for e in events(out.stdout) if e["event"] == "text"] == GOOD  # streamed as it came
    outputs = finished(out)["outputs"]
    assert outputs["json"] == {"city": "Paris", "items": [{"price": 3.5}]} and outputs["text"] == "".join(GOOD)
    done = next(e for e in events(out.stdout) if e["event"] == "run_finished")
    assert done["outputs"] == {"city": "Paris", "price": 3.5, "text": "".join(GOOD)}
    sent = llm.chat_requests[-1].json["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "answer"
    assert sent["json_schema"]["strict"] is True and sent["json_schema"]["schema"]["required"] == ["city", "items"]


def test_the_request_carries_response_format_as_the_sdk_sends_it(llm, write_flow) -> None:
    """The streaming request is built by flowrunner, not by the SDK: its body must be the SDK's."""
    import openai

    fmt = {"type": "json_schema", "json_schema": {"name": "city_answer", "description": "a city",
                                                  "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                             "required": ["city"], "additionalProperties": False},
                                                  "strict": True}}
    step = f"    response_format: {json.dumps(fmt)}\n"
    flow = write_flow(chat_flow("sdk-body", before=step))
    llm.script(Reply(text='{"city": "Oslo"}'))
    assert run_flow(llm, flow, question="hi").returncode == 0
    ours = llm.chat_requests[-1].json
    client = openai.OpenAI(base_url=llm.base_url, api_key="sk-test-key", max_retries=0)
    llm.script(Reply(text='{"city": "Oslo"}'))
    with client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                        temperature=0.7, response_format=fmt, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
    sdks = llm.chat_requests[-1].json
    assert ours == sdks and ours["response_format"] == fmt
    # json_object too, and with stream: false the SDK itself sends it
    flow = write_flow(chat_flow("sdk-object", before="    response_format: {type: json_object}\n    stream: false\n"))
    llm.script(Reply(text='{"a": 1}'))
    assert run_flow(llm, flow, question="hi").returncode == 0
    assert llm.chat_requests[-1].json["response_format"] == {"type": "json_object"}


def test_an_answer_that_does_not_fit_fails_naming_the_path_and_the_rule(llm, write_flow) -> None:
    llm.script(Reply(text='{"city": "Paris", "items": [{"price": 1}, {"price": 2}, {"price": -1}]}'))
    flow = write_flow(chat_flow("unfit", before=SCHEMA, after=USES))
    out = run_flow(llm, flow)
    assert out.returncode == 1
    assert "step 'answer' (chat_completion) failed: the answer does not fit the schema: " \
           "$.items[2].price: -1 is less than the minimum of 0" in out.stderr
    assert "hint:" in out.stderr and "retry: {attempts: 2}" in out.stderr
    assert out.stdout.startswith('{"city": "Paris"')  # it streamed before it was checked
    assert len(llm.chat_requests) == 1  # not asked again: `retry` is one attempt by default


def test_an_answer_that_is_not_json_fails(llm, write_flow) -> None:
    llm.script(Reply(text="Paris is the city."))
    out = run_flow(llm, write_flow(chat_flow("not-json", before=SCHEMA)))
    assert out.returncode == 1
    assert "failed: the answer is not JSON: Expecting value at line 1 column 1" in out.stderr
    assert "Paris is the city." in out.stdout


def test_an_answer_cut_off_says_so(llm, write_flow) -> None:
    llm.script(Reply(text='{"city": "Par', finish_reason="length"))
    out = run_flow(llm, write_flow(chat_flow("cut", before=SCHEMA)))
    assert out.returncode == 1 and "cut off at max_completion_tokens" in out.stderr


def test_a_fenced_answer_and_json_object_mode(llm, write_flow) -> None:
    """json_object: parsed, not checked against a schema; `result` keeps the text (no schema)."""
    after = "outputs:\n  n: ${steps.answer.json.n}\n  text: ${response}\n"
    flow = write_flow(chat_flow("object", before="    response_format: {type: json_object}\n", after=after))
    llm.script(Reply(text='```json\n{"n": [1, 2]}\n```'))
    out = run_flow(llm, flow, "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"n": [1, 2], "text": '```json\n{"n": [1, 2]}\n```'}


def test_retry_asks_again_with_the_error(llm, write_flow) -> None:
    llm.script(Reply(text='{"city": "Paris", "items": [{"price": -1}]}'), Reply(text=GOOD))
    flow = write_flow(chat_flow("reask", before=SCHEMA + "    retry: {attempts: 2, backoff: 30}\n", after=USES))
    out = run_flow(llm, flow, "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    kinds = [(e["event"], e.get("text") or e.get("message")) for e in events(out.stdout)
             if e["event"] in ("text", "warning")]
    warning = [m for k, m in kinds if k == "warning"]
    assert warning == ["the answer does not fit the schema: $.items[0].price: -1 is less than the minimum of 0: "
                       "asking the model again (retry 1 of 1)"]
    retrying = [e for e in events(out.stdout) if e["event"] == "step_retrying"]
    assert [(e["attempt"], e["delay"]) for e in retrying] == [(1, 0)]  # at once: no backoff for a re-ask
    assert retrying[0]["error"].startswith("the answer does not fit the schema: $.items[0].price")
    texts = "".join(m for k, m in kinds if k == "text")
    assert texts == '{"city": "Paris", "items": [{"price": -1}]}\n' + "".join(GOOD)  # both answers streamed
    assert kinds.index(("warning", warning[0])) < kinds.index(("text", GOOD[0]))
    outputs = finished(out)["outputs"]
    assert outputs["json"]["items"] == [{"price": 3.5}] and outputs["text"] == "".join(GOOD)
    first, second = llm.chat_requests
    assert second.json["messages"][:-2] == first.json["messages"]
    assert second.json["messages"][-2] == {"role": "assistant", "content": '{"city": "Paris", "items": [{"price": -1}]}'}
    assert second.json["messages"][-1]["role"] == "user"
    assert "$.items[0].price: -1 is less than the minimum of 0" in second.json["messages"][-1]["content"]
    assert second.json["response_format"] == first.json["response_format"]


def test_retry_used_up_fails(llm, write_flow) -> None:
    llm.script(Reply(text="no"), Reply(text="still no"), Reply(text="nope"))
    out = run_flow(llm, write_flow(chat_flow("reask-fail", before=SCHEMA + "    retry: 3\n")))
    assert out.returncode == 1 and "the answer is not JSON" in out.stderr and "(after 3 attempts)" in out.stderr
    assert out.stdout == "no\nstill no\nnope\n"  # every answer streamed, each re-ask on a line of its own
    assert len(llm.chat_requests) == 3
    third = llm.chat_requests[2].json["messages"]  # each re-ask carries the earlier ones
    assert [m["content"] for m in third if m["role"] == "assistant"] == ["no", "still no"]


def test_retry_after_text_still_stops_other_failures(llm, write_flow) -> None:
    """Only a structured answer that does not fit is re-asked once text has streamed."""
    llm.script(Reply(text='{"city": "Paris", "items": []}', disconnect_after=2), Reply(text=GOOD))
    out = run_flow(llm, write_flow(chat_flow("broken", before=SCHEMA + "    retry: 2\n")))
    assert out.returncode == 1 and len(llm.chat_requests) == 1


def test_a_schema_file_beside_the_flow(llm, write_flow, tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "city.json").write_text(json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}), encoding="utf-8")
    flow = write_flow(chat_flow("file", before="    output_schema: {file: schemas/city.json}\n    strict: false\n",
                                after="outputs:\n  city: ${response.city}\n"))
    llm.script(Reply(text='{"city": "Rome"}'))
    out = run_flow(llm, flow, "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"city": "Rome"}
    sent = llm.chat_requests[-1].json["response_format"]["json_schema"]
    assert sent["schema"]["required"] == ["city"] and sent["strict"] is False
    bad = write_flow(chat_flow("file", before="    output_schema: {file: schemas/city.json}\n",
                               after="outputs:\n  city: ${response.town}\n"), "bad.yaml")
    out = run_cli("validate", str(bad))
    assert out.returncode == 1
    assert f"bad.yaml:{line_col(bad.read_text(), '${response.town}')}: " in out.stdout
    assert "declares no 'town'" in out.stdout


def validate(*files: Path):
    """`flowrunner validate`: its problems (on stdout) and summary (on stderr) as one text."""
    out = run_cli("validate", *map(str, files))
    return out.returncode, out.stdout + out.stderr


def test_validate_rejects_an_invalid_schema_located(write_flow, tmp_path: Path) -> None:
    flow = write_flow(chat_flow("bad-schema", before=SCHEMA.replace("{type: string}", "{type: strin}")
                                .replace("minimum: 0", "minimum: zero")))
    rc, report = validate(flow)
    text = flow.read_text()
    assert rc == 1
    assert (f"flow.yaml:{line_col(text, 'strin}')}: steps[0].output_schema.properties.city.type: "
            "not a valid JSON Schema: 'strin' is not a JSON type") in report
    assert "did you mean 'string'?" in report
    assert f"flow.yaml:{line_col(text, 'zero')}: steps[0].output_schema.properties.items.items" in report
    # in a schema file: the place inside that file; a missing file: the place in the flow
    (tmp_path / "s.json").write_text('{\n  "type": "object",\n  "required": "city"\n}\n', encoding="utf-8")
    files = write_flow(chat_flow("files", before="    output_schema: {file: s.json}\n") + """\
  - id: again
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: hi
    output_schema: {file: missing.json}
  - id: outside
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    user_prompt: hi
    output_schema: {file: ../elsewhere.json}
""", "files.yaml")
    rc, report = validate(files)
    text = files.read_text()
    assert rc == 1
    assert "s.json:3:15: required: not a valid JSON Schema: 'city' is not of type 'array'" in report
    assert f"files.yaml:{line_col(text, 'missing.json')}: steps[1].output_schema.file: missing.json: no such file" \
        in report
    assert f"files.yaml:{line_col(text, '../elsewhere.json')}: " in report and "lies outside the flow" in report


def test_validate_rejects_a_reference_to_an_undeclared_field(write_flow) -> None:
    after = USES.replace("steps.answer.json.city}\"", "steps.answer.json.cty}\"").replace(
        "${response.items[0].price}\"", "${response.items[0].prise}\"")
    flow = write_flow(chat_flow("typo", before=SCHEMA, after=after))
    rc, report = validate(flow)
    text = flow.read_text()
    assert rc == 1
    assert (f"flow.yaml:{line_col(text, '${steps.answer.json.cty}')}: steps[1].values.city: "
            "${steps.answer.json.cty}: the schema of step 'answer' declares no 'cty' in its json") in report
    assert "did you mean 'city'?" in report
    assert (f"flow.yaml:{line_col(text, '${response.items[0].prise}')}: steps[1].values.price: "
            "${response.items[0].prise}: the schema of step 'answer' declares no 'prise' in its json.items[0]") \
        in report
    assert "did you mean 'price'?" in report
    plain = write_flow(chat_flow("no-json", after="outputs:\n  x: ${steps.answer.json}\n"), "plain.yaml")
    rc, report = validate(plain)
    assert rc == 1 and "step 'answer' has no output 'json'" in report


@pytest.mark.parametrize("step, said", [
    ("    strict: false\n", "`strict` applies to output_schema"),
    ("    json_retries: 1\n", "json_retries"),  # one knob: the step's `retry`
    ("    response_format: {type: json_schema}\n", "response_format json_schema needs a name"),
    ("    response_format: {type: json_object, name: a}\n", "name is for type json_schema, not 'json_object'"),
    ("    response_format: {type: json_schema, name: a, json_schema: {name: a}}\n", "write name inside json_schema"),
    ("    response_format: {type: json_schema, name: 'a b'}\n", "'a b' is not letters, digits"),
    ("    response_format: {type: json_schema, json_schema: {name: 'a b'}}\n", "'a b' is not letters, digits"),
    (SCHEMA + "    response_format: {type: json_object}\n", "give output_schema or response_format, not both"),
    ("    output_schema: {file: s.json, type: object}\n", "output_schema with `file` takes nothing else"),
    ("    output_schema: {type: object, description: 'costs ${inputs.question}'}\n",
     "a reference is not resolved inside a JSON Schema"),
    ("    output_schema: {type: object, properties: {a: {$ref: '#/$defs/nope'}}}\n",
     "$ref '#/$defs/nope' points at nothing in this schema"),
    ("    output_schema: {type: object, properties: {a: {type: string, pattern: '(['}}}\n",
     "'([' is not a valid regular expression"),
    ('    output_schema: {file: "a\\0b.json"}\n', "steps[0].output_schema.file: 'a\\x00b.json': not a usable file name"),
    ("    output_schema: {file: .}\n", "steps[0].output_schema.file: .: is a folder, not a file"),
])
def test_validate_rejects_misused_properties(write_flow, step: str, said: str) -> None:
    flow = write_flow(chat_flow("misuse", before=step))
    rc, report = validate(flow)
    assert rc == 1 and said in report and "flow.yaml:" in report and "internal error" not in report


def test_dry_run_record_and_replay_carry_response_format(llm, write_flow, tmp_path: Path) -> None:
    flow = write_flow(chat_flow("replay", before=SCHEMA, after=USES))
    out = run_flow(llm, flow, "--dry-run")
    assert out.returncode == 0, out.stderr
    request = json.loads(out.stdout[:out.stdout.index("\n}\n") + 2])["request"]
    assert request["response_format"]["json_schema"]["name"] == "answer" and not llm.chat_requests
    rec = tmp_path / "rec.jsonl"
    llm.script(Reply(text=GOOD))
    assert run_flow(llm, flow, "--record", str(rec)).returncode == 0
    out = run_flow(llm, flow, "--replay", str(rec), "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["price"] == 3.5 and len(llm.chat_requests) == 1
    changed = write_flow(flow.read_text().replace("minimum: 0", "minimum: 1"), "changed.yaml")
    out = run_flow(llm, changed, "--replay", str(rec))
    assert out.returncode == 1 and "replay mismatch" in out.stderr and "response_format" in out.stderr


def test_the_readme_example_validates_and_its_typos_do_not(write_flow) -> None:
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("#### Structured output"):]
    block = section[section.index("```yaml\n") + 8:section.index("\n```", section.index("```yaml\n"))]
    head = ("version: 1\nname: readme\ninputs:\n  invoice: {type: string}\nconnections:\n"
            "  llm: {type: openai, api_key: sk-test}\n")
    rc, report = validate(write_flow(head + block + "\n"))
    assert rc == 0, report
    rc, report = validate(write_flow(head + block.replace("items[0].price", "items[0].prise") + "\n", "typo.yaml"))
    assert rc == 1 and "declares no 'prise' in its json.items[0]" in report and "did you mean 'price'?" in report


def test_a_refusal_leaves_json_null_and_a_literal_dollar_brace_is_sent(llm, write_flow) -> None:
    step = "    output_schema: {type: object, description: 'costs $${price}', properties: {a: {type: string}}}\n"
    flow = write_flow(chat_flow("refused", before=step, after="outputs:\n  a: ${steps.answer.json.a}\n"))
    llm.script(Reply(refusal="I can't help with that."))
    out = run_flow(llm, flow, "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    outputs = finished(out)["outputs"]
    assert outputs["json"] is None and outputs["refusal"] == "I can't help with that."
    assert any(e["event"] == "warning" and "refused" in e["message"] for e in events(out.stdout))
    sent = llm.chat_requests[-1].json["response_format"]["json_schema"]["schema"]
    assert sent["description"] == "costs ${price}"


FLAT = {"type": "json_schema", "name": "city_answer", "description": "a city", "strict": True,
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}


def test_the_flat_response_format_is_sent_as_the_sdk_sends_the_nested_one(llm, write_flow) -> None:
    """{type: json_schema, name, schema, strict} on the step: the request nests them as the SDK does."""
    import openai

    after = "outputs:\n  city: ${steps.answer.json.city}\n  bound: ${response.city}\n"
    flow = write_flow(chat_flow("flat", before=f"    response_format: {json.dumps(FLAT)}\n", after=after))
    llm.script(Reply(text='{"city": "Oslo"}'))
    out = run_flow(llm, flow, "--output", "json", question="hi")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"city": "Oslo", "bound": "Oslo"}  # parsed, checked, bound to `result`
    ours = llm.chat_requests[-1].json
    nested = {"type": "json_schema", "json_schema": {k: v for k, v in FLAT.items() if k != "type"}}
    client = openai.OpenAI(base_url=llm.base_url, api_key="sk-test-key", max_retries=0)
    llm.script(Reply(text='{"city": "Oslo"}'))
    with client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                        temperature=0.7, response_format=nested, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
    assert ours == llm.chat_requests[-1].json and ours["response_format"] == nested
    llm.script(Reply(text='{"town": "Oslo"}'))
    out = run_flow(llm, flow, question="hi")
    assert out.returncode == 1 and "the answer does not fit the schema: $: " in out.stderr


def test_validate_checks_the_flat_schema_and_references_into_it(write_flow) -> None:
    bad = dict(FLAT, schema={"type": "object", "properties": {"city": {"type": "strin"}}})
    flow = write_flow(chat_flow("flat-bad", before=f"    response_format: {json.dumps(bad)}\n"))
    rc, report = validate(flow)
    assert rc == 1
    where = line_col(flow.read_text(), '"strin"')
    assert (f"flow.yaml:{where}: steps[0].response_format.schema.properties.city"
            ".type: not a valid JSON Schema: 'strin' is not a JSON type") in report
    typo = write_flow(chat_flow("flat-typo", before=f"    response_format: {json.dumps(FLAT)}\n",
                                after="outputs:\n  city: ${steps.answer.json.cty}\n"), "typo.yaml")
    rc, report = validate(typo)
    assert rc == 1
    assert (f"typo.yaml:{line_col(typo.read_text(), '${steps.answer.json.cty}')}: outputs.city: "
            "${steps.answer.json.cty}: the schema of step 'answer' declares no 'cty' in its json") in report
    assert "did you mean 'city'?" in report
    assert validate(write_flow(chat_flow("flat-ok", before=f"    response_format: {json.dumps(FLAT)}\n",
                                         after="outputs:\n  city: ${steps.answer.json.city}\n"), "ok.yaml"))[0] == 0


def test_a_reask_goes_to_the_fallback_that_answered(llm, write_flow) -> None:
    """The primary fails before answering (503); the fallback's answer does not fit: the re-ask goes to
    the fallback, with its answer, not back to the primary."""
    from tests.support.fixtures import OpenAIServer

    with OpenAIServer() as backup:
        backup.script(Reply(text='{"city": 1}'), Reply(text='{"city": "Oslo"}'))
        llm.script(Reply(status=503, error="overloaded"))
        connections = (LLM_FROM_ENV + '\n  backup: {type: openai, api_key: sk-backup, base_url: "${env.BACKUP_URL}", '
                       "max_retries: 0}")
        step = ("    response_format: " + json.dumps(FLAT) + "\n    retry: 2\n"
                "    fallback:\n      - {connection: backup, model: gpt-4o}\n")
        flow = write_flow(chat_flow("reask-fallback", connection=connections, before=step,
                                    after="outputs:\n  city: ${steps.answer.json.city}\n"
                                          "  connection: ${steps.answer.connection}\n"))
        out = run_cli("run", str(flow), "-i", "question=hi", "--output", "json",
                      env={**openai_env(llm), "BACKUP_URL": backup.base_url})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"city": "Oslo", "connection": "backup"}
        assert len(llm.chat_requests) == 1 and len(backup.chat_requests) == 2
        again = backup.chat_requests[1].json
        assert again["model"] == "gpt-4o" and again["messages"][-2] == {"role": "assistant", "content": '{"city": 1}'}
        assert "asking the model again (retry 1 of 1)" in out.stderr


def test_a_reask_is_recorded_and_replayed(llm, write_flow, tmp_path: Path) -> None:
    llm.script(Reply(text='{"city": "Paris", "items": [{"price": -1}]}'), Reply(text=GOOD))
    flow = write_flow(chat_flow("reask-rec", before=SCHEMA + "    retry: 2\n", after=USES))
    rec = tmp_path / "rec.jsonl"
    assert run_flow(llm, flow, "--record", str(rec)).returncode == 0
    out = run_flow(llm, flow, "--replay", str(rec), "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["price"] == 3.5 and len(llm.chat_requests) == 2  # the replay asked no one
    assert "asking the model again (retry 1 of 1)" in out.stderr
