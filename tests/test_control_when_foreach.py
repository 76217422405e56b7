"""Issue 14: conditions (`when`) and loops (`for_each`, `concurrency`, `on_item_failure`), through the
real command line and the OpenAI-protocol test server: load-time errors and warnings located at
file:line:col, the event stream (skipped steps with their reason, items in order), concurrency that
is really concurrent (the server holds a reply until the other item's request is answered), and a
looped chat step's text never interleaved."""

from __future__ import annotations

import json
import re
import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.support.chat_flows import LLM_FROM_ENV, openai_env
from tests.support.fixtures import Reply
from tests.support.jsonlines import events

HEAD = """version: 1
name: control
inputs:
  n: {type: integer, default: 3}
  word: {type: string, default: pear}
  names: {type: array, default: [ada, bob, cy]}
steps:
"""


def step_events(out: str, step: str) -> list[dict]:
    return [e for e in events(out) if e.get("step") == step and e["event"].startswith("step_")]


def finished(out: str) -> dict[str, dict]:
    """The last step_finished of each step (a for_each step's own end comes after its items')."""
    return {e["step"]: e for e in events(out) if e["event"] == "step_finished" and e.get("item") is None}


# --- when ---------------------------------------------------------------------------------------

def test_a_false_condition_skips_the_step_with_its_reason_and_null_outputs(write_flow) -> None:
    flow = write_flow(HEAD + """\
  - id: big
    type: set
    when: {value: "${inputs.n}", gt: 5}
    values: {size: {label: big}}
  - id: small
    type: set
    when: {value: "${inputs.n}", lte: 5}
    values: {label: small}
  - id: after
    type: set
    values:
      from_var: ${size}
      inside: ${steps.big.size.label}
      both: "${steps.small.label}/${steps.big.size.label}"
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    done = finished(out.stdout)
    assert done["big"]["status"] == "skipped"
    assert done["big"]["reason"] == "when: ${inputs.n} gt 5 is false (${inputs.n} is 3)"
    assert done["big"]["outputs"] == {"size": None}
    assert done["small"]["status"] == "ok" and done["small"]["reason"] is None
    # A later step reads null from the skipped step (also a path inside its null), never fails.
    assert done["after"]["outputs"] == {"from_var": None, "inside": None, "both": "small/"}
    assert not [e for e in step_events(out.stdout, "big") if e["event"] == "step_started"]
    # The reason reaches the logs too.
    logs = run_cli("--log-format", "json", "run", str(flow), "--sink", "none")
    skipped = [json.loads(line) for line in logs.stderr.splitlines() if '"step skipped"' in line]
    assert skipped and skipped[0]["step"] == "big" and "gt 5 is false" in skipped[0]["reason"]


def test_a_skipped_step_never_overwrites_a_variable_set_before(write_flow) -> None:
    flow = write_flow(HEAD + """\
  - id: default
    type: set
    values: {answer: fallback}
  - id: maybe
    type: set
    when: {value: "${inputs.word}", equals: apple}
    values: {answer: apple pie}
outputs:
  answer: ${answer}
""")
    assert run_cli("run", str(flow), "--output", "json").stdout.strip() == '{\n  "answer": "fallback"\n}'
    pie = run_cli("run", str(flow), "-i", "word=apple", "--output", "json")
    assert json.loads(pie.stdout) == {"answer": "apple pie"}


OPERATORS = HEAD + """\
  - id: data
    type: set
    values: {text: "a pear tree", list: [1, 2, 3], map: {k: 1}, none: null, zero: 0}
  - {id: eq, type: set, when: {value: "${inputs.word}", equals: pear}, values: {r1: 1}}
  - {id: ne, type: set, when: {value: "${inputs.word}", not_equals: pear}, values: {r2: 1}}
  - {id: in_, type: set, when: {value: "${inputs.word}", in: [apple, pear]}, values: {r3: 1}}
  - {id: notin, type: set, when: {value: "${inputs.word}", not_in: [apple, pear]}, values: {r4: 1}}
  - {id: gt_, type: set, when: {value: "${inputs.n}", gt: 3}, values: {r5: 1}}
  - {id: gte_, type: set, when: {value: "${inputs.n}", gte: 3}, values: {r6: 1}}
  - {id: lt_, type: set, when: {value: "${inputs.n}", lt: "${steps.data.zero}"}, values: {r7: 1}}
  - {id: lte_, type: set, when: {value: "${inputs.n}", lte: 3.0}, values: {r8: 1}}
  - {id: has_text, type: set, when: {value: "${steps.data.text}", contains: pear}, values: {r9: 1}}
  - {id: has_item, type: set, when: {value: "${steps.data.list}", contains: 2}, values: {r10: 1}}
  - {id: has_key, type: set, when: {value: "${steps.data.map}", contains: k}, values: {r11: 1}}
  - {id: empty_, type: set, when: {value: "${steps.data.none}", empty: true}, values: {r12: 1}}
  - {id: full, type: set, when: {value: "${steps.data.list}", empty: true}, values: {r13: 1}}
  - {id: exists_, type: set, when: {value: "${steps.data.list[7]}", exists: true}, values: {r14: 1}}
  - {id: missing, type: set, when: {value: "${steps.data.list[7]}", exists: false}, values: {r15: 1}}
  - id: all_
    type: set
    when: {all: [{value: "${inputs.n}", gt: 1}, {value: "${inputs.word}", equals: pear}]}
    values: {r16: 1}
  - id: any_
    type: set
    when: {any: [{value: "${inputs.n}", gt: 10}, {value: "${inputs.word}", in: "${steps.data.list}"}]}
    values: {r17: 1}
  - {id: not_, type: set, when: {not: {value: "${inputs.n}", gt: 10}}, values: {r18: 1}}
  - {id: null_gt, type: set, when: {value: "${steps.data.none}", gt: 0}, values: {r19: 1}}
  - {id: bool_is_not_1, type: set, when: {value: true, equals: 1}, values: {r20: 1}}
"""


def test_every_operator(write_flow) -> None:
    out = run_cli("run", str(write_flow(OPERATORS)), "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    ran = {step for step, e in finished(out.stdout).items() if e["status"] == "ok"} - {"data"}
    assert ran == {"eq", "in_", "gte_", "lte_", "has_text", "has_item", "has_key", "empty_", "missing",
                   "all_", "not_"}
    reasons = {step: e["reason"] for step, e in finished(out.stdout).items() if e["status"] == "skipped"}
    assert reasons["any_"].startswith("when: any: none holds: ${inputs.n} gt 10 is false (${inputs.n} is 3);")
    assert reasons["exists_"] == "when: ${steps.data.list[7]} exists true is false (${steps.data.list[7]} is null)"
    # Other inputs, the other way round.
    out = run_cli("run", str(write_flow(OPERATORS)), "-i", "n=11", "-i", "word=fig", "--sink", "jsonl:-")
    ran = {step for step, e in finished(out.stdout).items() if e["status"] == "ok"} - {"data"}
    assert {"ne", "notin", "gt_", "gte_", "any_"} <= ran and not {"eq", "in_", "all_", "not_", "lte_"} & ran


def test_comparing_incompatible_values_at_run_time_fails_the_step_by_name(write_flow) -> None:
    flow = write_flow(HEAD + """\
  - id: data
    type: set
    values: {v: abc}
  - id: compare
    type: set
    when: {value: "${steps.data.v}", gt: 1}
    values: {x: 1}
  - id: after
    type: set
    values: {y: 2}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert ("step 'compare' (set) failed: when: 'gt' compares numbers; ${steps.data.v} is a string \"abc\""
            in out.stderr), out.stderr
    assert "hint: compare text with equals, in or contains" in out.stderr
    assert finished(out.stdout)["after"]["reason"] == "an earlier step failed"


# --- load time: errors ----------------------------------------------------------------------------

BAD = [
    ("    when: {value: 1, greater: 0}\n", "10:22", "unknown property 'greater'"),
    ("    when: {value: 1, gt: 0, lt: 5}\n", "10:29", "two operators in one condition: 'gt' and 'lt'"),
    ("    when: {value: abc, gt: 0}\n", "10:19", "'gt' compares numbers; the value is text"),
    ('    when: {value: "${inputs.word}", gte: 1}\n', "10:19", "'gte' compares numbers; the value is text"),
    ('    when: {value: "${inputs.n}", contains: 1}\n', "10:19",
     "'contains' looks inside text, a list or a mapping; the value is a number"),
    ('    when: {value: "${inputs.word}", contains: 1}\n', "10:47", "'contains' on text takes text; got a number"),
    ('    when: {value: "${inputs.word}", in: pear}\n', "10:41", "expected a list or a ${...} reference, got a string"),
    ('    when: {value: pear, in: "${inputs.word}"}\n', "10:29", "'in' takes a list of values; got text"),
    ('    when: {value: 2, lt: "${inputs.word}"}\n', "10:26", "'lt' compares numbers; got text"),
    ('    when: {value: "${inputs.n}", empty: true}\n', "10:19", "'empty' applies to text, lists and mappings"),
    ('    when: {value: "${inputs.nope}", exists: true}\n', "10:20", "${inputs.nope}: unknown input 'nope'"),
    ('    when: {value: "${steps.later.x}", exists: true}\n', "10:20", "step 'later' runs after this one"),
    ('    when: {value: 1, gt: "${nothing}"}\n', "10:27", "${nothing}: unknown variable 'nothing'"),
    ("    when: {gt: 0}\n", "10:11", "the condition 'gt' has no `value:` to test"),
    ("    when: {value: 1}\n", "10:11", "the condition has no operator"),
    ("    when: {all: [{value: 1, gt: 0}], value: 1}\n", "10:38", "this one has both 'all' and 'value'"),
    ("    when: {not: {value: 1, gt: 0, equals: 1}}\n", "10:35", "two operators in one condition"),
    ("    when: {all: []}\n", "10:17", "needs at least 1 item(s)"),
    ('    when: {value: "${item}", exists: true}\n', "10:20", "${item}: there is no item here"),
    ("    concurrency: 2\n", "10:5", "concurrency applies to a step with for_each; this one has none"),
    ("    on_item_failure: continue\n", "10:5", "on_item_failure applies to a step with for_each"),
    ("    for_each: [1]\n    concurrency: 0\n", "11:18", "must be ≥ 1, got 0"),
    ("    for_each: [1]\n    on_item_failure: skip\n", "11:22", "'skip' is not one of: fail, continue"),
    ("    for_each: 12\n", "10:15", "expected a list or a ${...} reference, got an integer 12"),
    ('    for_each: "${names}"\n', "10:16", "${names}: unknown variable 'names'"),
    ('    for_each: "${item}"\n', "10:16", "`when` and `for_each` are read once, before the items"),
    ('    for_each: "${inputs.word}"\n', "10:15",
     "for_each takes a list; ${inputs.word} is the input 'word', declared string"),
]


@pytest.mark.parametrize(("line", "where", "message"), BAD, ids=[b[2][:40] for b in BAD])
def test_each_mistake_is_located(write_flow, line: str, where: str, message: str) -> None:
    flow = write_flow(HEAD.replace("steps:\n", "") + "steps:\n  - id: s\n    type: set\n" + line
                      + "    values: {x: 1}\n  - id: later\n    type: set\n    values: {y: 1}\n")
    out = run_cli("validate", str(flow))
    assert out.returncode == 1, out.stdout
    assert f"{flow}:{where}: " in out.stdout and message in out.stdout, out.stdout
    assert "internal error" not in out.stdout + out.stderr and "Traceback" not in out.stderr
    ran = run_cli("run", str(flow))
    assert ran.returncode == 2 and message in ran.stderr


def test_item_outside_a_for_each_step_is_located(write_flow) -> None:
    flow = write_flow(HEAD + """\
  - id: s
    type: set
    values: {x: "${item.name} at ${item_index}"}
""")
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    assert f"{flow}:10:18: steps[0].values.x: ${{item.name}}: there is no item here" in out.stdout
    assert f"{flow}:10:34: steps[0].values.x: ${{item_index}}: there is no item here" in out.stdout
    assert "hint: ${item} and ${item_index} exist inside a step with for_each: ${list}" in out.stdout


# --- load time: warnings --------------------------------------------------------------------------

WARNED = HEAD + """\
  - id: maybe
    type: set
    when: {value: "${inputs.n}", gt: 1}
    values: {m: 1}
  - id: reader
    type: set
    values: {a: "${m}", b: "${steps.maybe.m}"}
"""


def test_reading_a_possibly_skipped_step_warns_located_and_exits_0(write_flow) -> None:
    flow = write_flow(WARNED)
    text = run_cli("validate", str(flow))
    assert text.returncode == 0, text.stdout
    assert text.stdout.splitlines()[0] == (
        f"Warning: {flow}:14:18: steps[1].values.a: ${{m}}: variable 'm' is set only by step(s) with a `when` "
        "('maybe'); when they are skipped, this reads null")
    assert f"Warning: {flow}:14:29: steps[1].values.b: ${{steps.maybe.m}}: step 'maybe' has a `when`" in text.stdout
    assert "hint: give this step the same `when`" in text.stdout
    assert text.stderr.strip() == "1 file(s) valid, 2 warning(s)"
    as_json = json.loads(run_cli("validate", "--format", "json", str(flow)).stdout)
    assert as_json["valid"] is True and as_json["files"][0]["problems"] == []
    assert [(w["line"], w["col"], w["path"]) for w in as_json["files"][0]["warnings"]] == [
        (14, 18, "steps[1].values.a"), (14, 29, "steps[1].values.b")]
    github = run_cli("validate", "--format", "github", str(flow))
    assert github.returncode == 0
    assert github.stdout.startswith(f"::warning file={flow},line=14,col=18,title=flowrunner%3A steps[1].values.a::")


@pytest.mark.parametrize("guard", [
    '    when: {value: "${inputs.n}", gt: 1}\n',  # the same condition
    '    when: {all: [{value: "${inputs.word}", equals: pear}, {value: "${inputs.n}", gt: 1}]}\n',
    '    when: {all: [{value: "${m}", exists: true}, {value: "${steps.maybe.m}", empty: false}]}\n',
])
def test_a_guarded_reader_does_not_warn(write_flow, guard: str) -> None:
    flow = write_flow(WARNED.replace("    values: {a:", guard + "    values: {a:"))
    out = run_cli("validate", str(flow))
    assert out.returncode == 0 and "Warning" not in out.stdout, out.stdout
    assert out.stderr.strip() == "1 file(s) valid"


@pytest.mark.parametrize("other", [
    '    when: {value: "${inputs.n}", lte: 1}\n',  # complementary: one of the two always runs
    '    when: {not: {value: "${inputs.n}", gt: 1}}\n',
    "",  # no condition: the variable is always set
])
def test_a_variable_that_some_step_always_sets_does_not_warn(write_flow, other: str) -> None:
    flow = write_flow(WARNED.replace("  - id: reader", f"  - id: other\n    type: set\n{other}"
                                     "    values: {m: 2}\n  - id: reader").replace(', b: "${steps.maybe.m}"', ""))
    out = run_cli("validate", str(flow))
    assert out.returncode == 0 and "Warning" not in out.stdout, out.stdout


# --- for_each -------------------------------------------------------------------------------------

def test_for_each_runs_each_item_in_order_and_binds_the_list(write_flow) -> None:
    flow = write_flow(HEAD + """\
  - id: greet
    type: set
    for_each: ${inputs.names}
    concurrency: 3
    values: {line: "${item_index}: hello ${item}"}
  - id: people
    type: set
    for_each: [{name: ada, age: 36}, {name: bob, age: 7}]
    values: {who: "${item.name}", age: "${item.age}"}
outputs:
  lines: ${line}
  whole: ${steps.greet.line}
  ages: ${steps.people.age}
  errors: ${steps.greet.errors}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-")
    assert out.returncode == 0, out.stderr
    seq = [(e["event"], e["item"], e.get("items")) for e in step_events(out.stdout, "greet")]
    assert seq == [("step_started", None, 3),
                   ("step_started", 0, None), ("step_finished", 0, None),
                   ("step_started", 1, None), ("step_finished", 1, None),
                   ("step_started", 2, None), ("step_finished", 2, None),
                   ("step_finished", None, 3)]
    item_outputs = [e["outputs"] for e in step_events(out.stdout, "greet") if e["item"] is not None
                    and e["event"] == "step_finished"]
    assert item_outputs == [{"line": "0: hello ada"}, {"line": "1: hello bob"}, {"line": "2: hello cy"}]
    outputs = events(out.stdout)[-1]["outputs"]
    assert outputs == {"lines": ["0: hello ada", "1: hello bob", "2: hello cy"],
                       "whole": ["0: hello ada", "1: hello bob", "2: hello cy"], "ages": [36, 7], "errors": []}


def test_an_empty_list_runs_nothing_and_a_non_list_is_a_step_error(write_flow) -> None:
    flow = write_flow(HEAD + """\
  - id: none
    type: set
    for_each: []
    values: {x: "${item}"}
  - id: mk                      # a variable's type is known only at run time (an input's is checked at load)
    type: set
    values: {word: pear}
  - id: text
    type: set
    for_each: ${word}
    values: {y: "${item}"}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-")
    assert out.returncode == 1
    assert [(e["event"], e["item"]) for e in step_events(out.stdout, "none")] == [
        ("step_started", None), ("step_finished", None)]
    assert finished(out.stdout)["none"]["outputs"] == {"x": [], "errors": []}
    assert "step 'text' (set) failed: for_each takes a list; ${word} is a string 'pear'" in out.stderr, out.stderr
    assert "hint: give it a list" in out.stderr and "Traceback" not in out.stderr


def chat_flow_with(step: str) -> str:
    return f"""version: 1
name: looped
inputs:
  notes: {{type: array, default: [alpha, beta]}}
connections:
  {LLM_FROM_ENV}
steps:
  - id: say
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    for_each: ${{inputs.notes}}
    user_prompt: "note ${{item_index}}: ${{item}}"
{step}"""


def _by_note(replies: dict[str, Reply]):
    return lambda request: replies[request.json["messages"][-1]["content"]]


def test_concurrent_items_really_overlap_and_their_text_is_never_interleaved(write_flow, llm, tmp_path) -> None:
    """Item 0's reply is held until item 1's reply has been sent in full: only items that run at the
    same time get there. Item 1's text, which arrived first, still reaches the sink after item 0's."""
    first_held, second_sent = threading.Event(), threading.Event()
    llm.responder = _by_note({
        "note 0: alpha": Reply(text="Alpha one two three.", hold=first_held),
        "note 1: beta": Reply(text="Beta four five.", sent=second_sent),
    })
    flow = write_flow(chat_flow_with("    concurrency: 2\n    result: said\n"))
    jsonl = tmp_path / "events.jsonl"
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_cli, "run", str(flow), "--sink", f"jsonl:{jsonl}", env=openai_env(llm))
        overlapped = second_sent.wait(30)  # a guard against a hang, not a timing threshold
        first_held.set()
        out = run.result()
    assert overlapped, "item 1 was not answered while item 0 was held: the items did not run concurrently"
    assert out.returncode == 0, out.stderr
    seq = events(jsonl.read_text())
    text_by_item, current = [], None
    for e in seq:
        if e["event"] == "step_started" and e.get("item") is not None:
            current = e["item"]
        elif e["event"] == "text":
            text_by_item.append(current)
    assert text_by_item == sorted(text_by_item) and set(text_by_item) == {0, 1}
    assert "".join(e["text"] for e in seq if e["event"] == "text") == "Alpha one two three.Beta four five."
    assert seq[-1]["outputs"] == {"said": ["Alpha one two three.", "Beta four five."]}
    # The stdout sink: one item's text after the other, each on its line.
    first_held.clear()
    llm.responder = _by_note({"note 0: alpha": Reply(text="Alpha.", hold=first_held),
                              "note 1: beta": Reply(text="Beta.", sent=second_sent)})
    second_sent.clear()
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_cli, "run", str(flow), env=openai_env(llm))
        assert second_sent.wait(30)
        first_held.set()
        out = run.result()
    assert out.returncode == 0 and out.stdout == "Alpha.\nBeta.\n", (out.stdout, out.stderr)


def test_concurrency_1_runs_one_item_after_the_other(write_flow, llm) -> None:
    llm.responder = lambda request: Reply(text=request.json["messages"][-1]["content"].upper())
    flow = write_flow(chat_flow_with("    result: said\n"))
    out = run_cli("run", str(flow), "-i", 'notes=["a", "b", "c", "d"]', env=openai_env(llm))
    assert out.returncode == 0, out.stderr
    assert [r.json["messages"][-1]["content"] for r in llm.chat_requests] == [
        "note 0: a", "note 1: b", "note 2: c", "note 3: d"]
    assert out.stdout == "NOTE 0: A\nNOTE 1: B\nNOTE 2: C\nNOTE 3: D\n"


def test_on_item_failure_continue_nulls_the_item_and_lists_its_error(write_flow, llm) -> None:
    llm.responder = _by_note({
        "note 0: alpha": Reply(text="Fine."),
        "note 1: beta": Reply(status=400, error="This model does not like beta."),
        "note 2: gamma": Reply(text="Also fine."),
    })
    flow = write_flow(chat_flow_with("    concurrency: 2\n    on_item_failure: continue\n    result: said\n"
                                     "outputs:\n  said: ${said}\n  errors: ${steps.say.errors}\n"))
    out = run_cli("run", str(flow), "-i", 'notes=["alpha", "beta", "gamma"]', "--sink", "jsonl:-",
                  env=openai_env(llm))
    assert out.returncode == 0, out.stderr
    seq = events(out.stdout)
    assert seq[-1]["outputs"]["said"] == ["Fine.", None, "Also fine."]
    [error] = seq[-1]["outputs"]["errors"]
    assert error["index"] == 1 and "step 'say' (chat_completion) item 1 failed" in error["error"]
    assert "This model does not like beta." in error["error"]
    failed_item = [e for e in seq if e["event"] == "step_finished" and e.get("item") == 1][0]
    assert failed_item["status"] == "failed"
    warning = [e for e in seq if e["event"] == "warning" and e["step"] == "say"]
    assert warning and warning[0]["message"].startswith("1 of 3 items failed")


def test_a_failing_item_fails_the_step_by_default_and_items_retry_one_by_one(write_flow, llm) -> None:
    attempts: dict[str, int] = {}

    def respond(request):
        note = request.json["messages"][-1]["content"]
        attempts[note] = attempts.get(note, 0) + 1
        if note == "note 0: alpha" and attempts[note] == 1:
            return Reply(status=503, error="busy")  # transient: retried, for this item only
        if note == "note 1: beta":
            return Reply(status=400, error="no beta here")
        return Reply(text="ok")

    llm.responder = respond
    flow = write_flow(chat_flow_with("    retry: {attempts: 2, backoff: 0}\n"))
    out = run_cli("run", str(flow), "-i", 'notes=["alpha", "beta", "gamma"]', "--sink", "jsonl:-",
                  env=openai_env(llm))
    assert out.returncode == 1
    assert "step 'say' (chat_completion) item 1 failed" in out.stderr and "Traceback" not in out.stderr
    seq = events(out.stdout)
    retried = [e for e in seq if e["event"] == "step_retrying"]
    assert [(e["item"], e["attempt"]) for e in retried] == [(0, 1)]
    assert "note 2: gamma" not in attempts  # the step failed at item 1: item 2 never started
    assert seq[-1]["status"] == "failed"


# --- the example flow, and the README ------------------------------------------------------------

def readme_control_flow_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Control flow", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("flowrunner ")]


def test_the_example_flow_and_the_readme_commands(llm) -> None:
    commands = [c for c in readme_control_flow_commands() if "summarise_notes" in c]
    assert len(commands) >= 3, commands
    llm.responder = lambda request: Reply(text="Summary of " + request.json["messages"][-1]["content"] + ".")
    for command in commands:
        out = run_cli(*shlex.split(command)[1:], env=openai_env(llm))
        assert out.returncode == 0, (command, out.stderr)
        if command.startswith("flowrunner run") and "notes=[]" not in command:
            assert out.stdout.startswith("Summary of Note 0: "), out.stdout
            assert out.stdout.count("\n") == 2  # one line per note, in order
        elif "notes=[]" in command:
            assert "There are no notes to summarise." in out.stdout
    assert len(llm.chat_requests) == 2  # the run with no notes asked the model nothing
    events_run = run_cli("run", "flows/summarise_notes.yaml", "-i", 'notes=["x", "y", "z"]', "--sink", "jsonl:-",
                         env=openai_env(llm))
    seq = events(events_run.stdout)
    assert finished(events_run.stdout)["nothing"]["status"] == "skipped"
    assert seq[-1]["outputs"] == {"summaries": ["Summary of Note 0: x.", "Summary of Note 1: y.",
                                                "Summary of Note 2: z."], "failed": []}


def test_the_schema_and_the_step_reference_cover_the_options() -> None:
    schema = json.loads((ROOT / "schemas" / "flow.schema.json").read_text())
    for step_type in ("set", "chat_completion", "vector_search"):
        props = schema["$defs"][f"step.{step_type}"]["properties"]
        assert {"when", "for_each", "concurrency", "on_item_failure"} <= set(props)
    ops = set(schema["$defs"]["condition"]["properties"])
    assert ops == {"value", "equals", "not_equals", "in", "not_in", "gt", "gte", "lt", "lte", "contains",
                   "empty", "exists", "all", "any", "not"}
    described = run_cli("steps", "set").stdout
    assert "when, for_each, concurrency, on_item_failure" in described
    assert "`when`, `for_each`, `concurrency`, `on_item_failure`" in (ROOT / "reference/steps/set.md").read_text()
    assert Path(ROOT / "flows/summarise_notes.yaml").exists()


def test_serve_streams_a_looped_chat_step_in_order_with_the_usage_of_every_item(openai_server, llm, tmp_path) -> None:
    """`serve` consumes the same events: the items' texts one after the other, every item's usage
    counted once (the step's own end, whose outputs are lists, is not counted again), and a skipped
    step changes nothing."""
    from tests.test_serve import Server

    flow = tmp_path / "looped.yaml"
    flow.write_text(f"""version: 1
name: served-loop
inputs:
  question: {{type: string}}
connections:
  {LLM_FROM_ENV}
steps:
  - id: never
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    when: {{value: "${{inputs.question}}", equals: "never asked"}}
    user_prompt: unused
  - id: say
    type: chat_completion
    connection: llm
    model: gpt-4o-mini
    for_each: [one, two]
    concurrency: 2
    user_prompt: "${{item}}: ${{inputs.question}}"
""", encoding="utf-8")
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    llm.responder = lambda request: Reply(text=request.json["messages"][-1]["content"].split(":")[0].title() + ". ",
                                          usage=usage)
    server = Server(flow, openai_server.base_url)
    try:
        stream = server.client().chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "count"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
    finally:
        server.stop()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "One. Two. "
    assert chunks[-1].usage.total_tokens == 14 and chunks[-1].usage.prompt_tokens == 10
    assert len(llm.chat_requests) == 2


def test_items_running_when_the_run_is_interrupted_keep_their_text(write_flow, llm) -> None:
    """Ctrl-C during a looped chat step: each running item's text so far is in the step's list, which
    the run_on_failure step after it reads (as an unlooped chat step's partial text is)."""
    import os
    import signal
    import subprocess
    import sys

    llm.responder = lambda request: Reply(  # by item: the two requests may reach the server in either order
        text=("first words " if request.json["messages"][-1]["content"] == "a" else "second words ") * 40,
        chunk_delay=0.1)
    flow = write_flow(f"""version: 1
name: stopped-loop
inputs:
  notes: {{type: array, default: [a, b]}}
connections:
  {LLM_FROM_ENV}
steps:
  - id: each
    type: chat_completion
    for_each: ${{inputs.notes}}
    concurrency: 2
    connection: llm
    model: m
    user_prompt: ${{item}}
    result: texts
  - {{id: keep, type: set, run_on_failure: true, values: {{kept: "${{texts}}"}}}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "run", str(flow), "--sink", "jsonl:-"], cwd=ROOT,
                            env={**os.environ, **openai_env(llm)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        while b'"text": "first' not in (proc.stdout.readline() or b'"text": "first'):
            pass
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    ends = finished(out.decode())
    first, second = ends["keep"]["outputs"]["kept"]
    assert first and ("first words " * 40).startswith(first) and first != "first words " * 40
    assert second is None or ("second words " * 40).startswith(second)  # buffered, so never shown: still kept
    assert ends["each"]["outputs"]["text"] == [first, second]
