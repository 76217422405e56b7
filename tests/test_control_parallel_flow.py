"""Issue 14: `parallel` steps (branches at the same time) and `flow` steps (sub-flows), through the
real command line against the OpenAI-protocol test server."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from tests.conftest import run_cli
from tests.support.fixtures import Reply
from tests.support.jsonlines import events

LLM = """
connections:
  llm: {type: openai, api_key: "${env.OPENAI_API_KEY}", base_url: "${env.OPENAI_BASE_URL}"}
"""


def _env(llm) -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}


def _chat(sid: str, prompt: str, *, stream: bool = True, extra: str = "") -> str:
    return (f"      - {{id: {sid}, type: chat_completion, connection: llm, model: m, user_prompt: \"{prompt}\", "
            f"result: {sid}_text, stream: {str(stream).lower()}{extra}}}\n")


def _by_prompt(replies: dict[str, Reply]):
    def respond(request) -> Reply:
        return replies[request.json["messages"][-1]["content"]]
    return respond


def test_branches_run_at_the_same_time_and_only_the_streaming_one_writes_text(write_flow, llm) -> None:
    """Each reply is held until both requests have reached the server: a run that did the branches
    one after the other would never send the second request while the first waits (the server records
    a hold that is never released)."""
    both_arrived = threading.Event()
    arrived: list[str] = []
    lock = threading.Lock()

    def respond(request) -> Reply:
        prompt = request.json["messages"][-1]["content"]
        with lock:
            arrived.append(prompt)
            if len(arrived) == 2:
                both_arrived.set()
        text = "Streamed answer from the first branch." if prompt == "one" else "quiet second"
        return Reply(text=text, hold=both_arrived)

    llm.responder = respond
    flow = write_flow(f"""
version: 1
name: par
{LLM}
steps:
  - id: both
    type: parallel
    steps:
{_chat("first", "one")}{_chat("second", "two", stream=False)}
  - id: after
    type: set
    values: {{joined: "${{first_text}} + ${{second_text}} + ${{steps.both.second.text}}"}}
outputs:
  joined: ${{joined}}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env=_env(llm))
    assert out.returncode == 0, out.stderr
    assert not llm.errors, llm.errors  # no held reply waited in vain
    assert sorted(arrived) == ["one", "two"]
    seq = events(out.stdout)
    texts = [e for e in seq if e["event"] == "text"]
    assert texts and {e["step"] for e in texts} == {"first"}
    assert "".join(e["text"] for e in texts) == "Streamed answer from the first branch."
    steps = [(e["event"], e["step"]) for e in seq if e["event"] in ("step_started", "step_finished")]
    assert steps[0] == ("step_started", "both") and steps[-1] == ("step_finished", "after")
    assert steps.index(("step_finished", "both")) > max(steps.index(("step_finished", "first")),
                                                        steps.index(("step_finished", "second")))
    assert seq[-1]["outputs"]["joined"] == "Streamed answer from the first branch. + quiet second + quiet second"
    # The stdout sink: the streamed text alone, on one line, although the other branch ended meanwhile.
    llm.reset()
    both_arrived.clear()
    arrived.clear()
    llm.responder = respond
    plain = run_cli("run", str(flow), env=_env(llm))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("Streamed answer from the first branch.\n")


SETS = """
version: 1
name: shared
inputs:
  who: {type: string, default: Ada}
steps:
  - id: before
    type: set
    values: {greeting: "Hi ${inputs.who}"}
  - id: both
    type: parallel
    steps:
      - {id: a, type: set, values: {x: "${greeting} from a"}}
      - id: inner
        type: parallel
        steps:
          - {id: b, type: set, values: {y: "${inputs.who} from b"}}
          - {id: c, type: set, values: {z: "${steps.before.greeting} from c"}}
  - id: after
    type: set
    values: {all: "${x} | ${y} | ${z} | ${steps.b.y} | ${steps.both.a.x}"}
outputs:
  all: ${all}
  inner: ${steps.both.inner}
"""


def test_branches_share_the_run_variables_and_their_results_are_visible_after_the_group(write_flow) -> None:
    out = run_cli("run", str(write_flow(SETS)), "--output", "json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["all"] == "Hi Ada from a | Ada from b | Hi Ada from c | Ada from b | Hi Ada from a"
    assert result["inner"] == {"b": {"y": "Ada from b"}, "c": {"z": "Hi Ada from c"}}


def test_load_errors_of_a_parallel_group_are_located(write_flow) -> None:
    flow = write_flow(f"""
version: 1
name: bad
{LLM}
steps:
  - id: both
    type: parallel
    steps:
      - {{id: a, type: set, values: {{x: "A"}}}}
      - {{id: b, type: set, values: {{x: "B", w: "${{steps.a.x}}"}}}}
{_chat("c1", "hi")}{_chat("c2", "hello")}      - {{id: d, type: set, valuez: {{}}}}
  - {{id: a, type: set, values: {{q: 1}}}}
""")
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    err = out.stdout + out.stderr
    name = flow.name
    assert f"{name}:13:9: steps[0].steps[1]: variable 'x' is bound by two branches of parallel step 'both': 'a' and 'b'" in err
    assert f"{name}:13:49: steps[0].steps[1].values.w: ${{steps.a.x}}: step 'a' runs at the same time" in err
    assert (f"{name}:15:9: steps[0].steps[3]: branches 'c1' and 'c2' of parallel step 'both' both stream text to "
            "the sink; at most one branch may") in err
    assert f"{name}:16:28: steps[0].steps[4].valuez: unknown property 'valuez'" in err
    assert f"{name}:17:10: steps[1].id: duplicate step id 'a' (first used on line 12)" in err
    assert "Traceback" not in err


def test_a_failing_branch_cancels_the_others_but_not_one_that_runs_on_failure(write_flow, llm) -> None:
    never = threading.Event()  # the slow branch's answer never comes: only its cancellation ends it
    llm.responder = _by_prompt({
        "slow": Reply(text="never sent", hold=never),
        "bad": Reply(status=400, error="the model refused the request"),
        "keeper": Reply(text="kept", hold=llm.disconnected),  # answers once the slow one was cut off
    })
    flow = write_flow(f"""
version: 1
name: fail
{LLM}
steps:
  - id: both
    type: parallel
    steps:
{_chat("slow", "slow")}{_chat("broken", "bad", stream=False)}{_chat("keeper", "keeper", stream=False, extra=", run_on_failure: true")}
  - {{id: later, type: set, values: {{v: 1}}}}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env=_env(llm))
    assert out.returncode == 1
    finished = {e["step"]: e for e in events(out.stdout) if e["event"] == "step_finished"}
    assert finished["broken"]["status"] == "failed"
    assert finished["slow"]["status"] == "cancelled" and "branch 'broken' failed" in finished["slow"]["error"]
    assert finished["keeper"]["status"] == "ok" and finished["keeper"]["outputs"]["text"] == "kept"
    assert finished["both"]["status"] == "failed" and "the model refused the request" in finished["both"]["error"]
    assert finished["later"]["status"] == "skipped"
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "step 'broken' (chat_completion) failed" in errors[0], out.stderr
    assert f"{flow.name}:13:9:" in errors[0]  # at the branch that failed
    assert llm.disconnects >= 1


def test_connections_inside_branches_and_sub_flows_are_checked_before_anything_runs(write_flow) -> None:
    write_flow("""
version: 1
name: sub
connections:
  other: {type: openai, api_key: "${env.SUB_ONLY_KEY}"}
steps:
  - {id: ask, type: chat_completion, connection: other, model: m, user_prompt: hi}
""", "sub.yaml")
    flow = write_flow(f"""
version: 1
name: top
{LLM}
steps:
  - {{id: first, type: set, values: {{v: 1}}}}
  - id: both
    type: parallel
    steps:
{_chat("c", "hi", stream=False)}      - {{id: call, type: flow, flow: sub.yaml}}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env={"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""})
    assert out.returncode == 2, out.stderr
    assert "connection 'llm' needs an API key" in out.stderr
    assert "sub.yaml:5:" in out.stderr and "SUB_ONLY_KEY" in out.stderr  # the sub-flow's connection, in its own file
    assert '"step_started"' not in out.stdout


SUB = """
version: 1
name: triage
inputs:
  ticket: {type: string}
  urgent: {type: boolean, default: false}
connections:
  llm: {type: openai, api_key: "${env.NOT_USED_THE_CALLER_WINS}"}
steps:
  - {id: classify, type: chat_completion, connection: llm, model: m, user_prompt: "Classify: ${inputs.ticket}"}
  - {id: label, type: set, values: {label: "${response}", urgent: "${inputs.urgent}"}}
outputs:
  label: ${label}
  urgent: ${urgent}
"""


def test_a_sub_flow_runs_nested_in_the_event_stream_and_shares_the_pool(write_flow, llm) -> None:
    llm.script(Reply(text="warm up"), Reply(text="billing"))
    write_flow(SUB, "triage.yaml")
    flow = write_flow(f"""
version: 1
name: caller
inputs:
  message: {{type: string}}
{LLM}
steps:
  - {{id: hello, type: chat_completion, connection: llm, model: m, user_prompt: "${{inputs.message}}", stream: false}}
  - id: triage
    type: flow
    flow: triage.yaml
    inputs: {{ticket: "${{inputs.message}}"}}
    result: triage
outputs:
  label: ${{triage.label}}
  urgent: ${{steps.triage.outputs.urgent}}
""")
    out = run_cli("run", str(flow), "-i", "message=charged twice", "--sink", "jsonl:-", env=_env(llm))
    assert out.returncode == 0, out.stderr
    seq = events(out.stdout)
    assert [e["event"] for e in seq].count("run_started") == 1  # the sub-flow's own run events are left out
    nested = [(e["event"], e["step"]) for e in seq if e.get("step", "").startswith("triage")]
    assert nested[0] == ("step_started", "triage") and nested[-1] == ("step_finished", "triage")
    assert ("step_started", "triage/classify") in nested and ("step_finished", "triage/label") in nested
    assert "".join(e["text"] for e in seq if e["event"] == "text" and e["step"] == "triage/classify") == "billing"
    assert seq[-1]["outputs"] == {"label": "billing", "urgent": False}
    assert llm.chat_requests[1].json["messages"][-1]["content"] == "Classify: charged twice"
    # One pool: the caller's `llm` (its key; the sub-flow's own declaration of the name is not used)
    # answered both steps over one kept-alive connection.
    assert llm.chat_requests[0].connection == llm.chat_requests[1].connection
    assert llm.chat_requests[1].headers["authorization"] == "Bearer sk-test"
    # The stdout sink: the caller's answer (in one piece: stream false), then the sub-flow's, streamed.
    llm.reset()
    llm.script(Reply(text="warm up"), Reply(text="billing again"))
    plain = run_cli("run", str(flow), "-i", "message=charged twice", env=_env(llm))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("warm up\nbilling again\n")


def test_a_failing_sub_flow_fails_the_step_with_its_error(write_flow, llm) -> None:
    llm.script(Reply(status=400, error="no such model"))
    write_flow(SUB, "triage.yaml")
    flow = write_flow(f"""
version: 1
name: caller
{LLM}
steps:
  - {{id: triage, type: flow, flow: triage.yaml, inputs: {{ticket: t}}}}
""")
    out = run_cli("run", str(flow), env=_env(llm))
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out.stderr
    assert "step 'triage' (flow) failed: " in errors[0] and "triage.yaml:10:" in errors[0]
    assert "step 'classify' (chat_completion) failed" in errors[0] and "no such model" in errors[0]


def test_sub_flow_inputs_are_checked_when_the_flow_is_loaded(write_flow) -> None:
    write_flow(SUB, "triage.yaml")
    flow = write_flow("""
version: 1
name: caller
steps:
  - id: triage
    type: flow
    flow: triage.yaml
    inputs: {tickt: x, urgent: [1]}
  - {id: missing, type: flow, flow: nowhere.yaml}
""")
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    err = out.stdout + out.stderr
    assert "flow.yaml:8:13: steps[0].inputs: missing required input 'ticket' of the sub-flow 'triage.yaml'" in err
    assert "flow.yaml:8:14: steps[0].inputs.tickt: unknown input 'tickt' of the sub-flow 'triage.yaml'" in err
    assert "hint: did you mean 'ticket'?" in err
    assert "flow.yaml:8:32: steps[0].inputs.urgent: input 'urgent' of the sub-flow 'triage.yaml': expected a boolean" in err
    assert "flow.yaml:9:37: steps[1].flow: the sub-flow 'nowhere.yaml' does not exist" in err
    (flow.parent / "sub").mkdir()
    write_flow("version: 1\nname: c\nsteps:\n  - {id: s, type: set, values: {x: 1}}\n", "sub/classify.yaml")
    typo = write_flow("version: 1\nname: t\nsteps:\n  - {id: c, type: flow, flow: sub/clasify.yaml}\n", "typo.yaml")
    out = run_cli("validate", str(typo))
    assert out.returncode == 1 and "hint: did you mean 'sub/classify.yaml'?" in out.stdout + out.stderr


def test_a_reference_into_a_sub_flows_outputs_is_checked_against_what_it_declares(write_flow) -> None:
    write_flow("version: 1\nname: sub\nsteps:\n  - {id: s, type: set, values: {lab: x}}\noutputs: {label: \"${lab}\"}\n",
               "sub.yaml")
    flow = write_flow("""
version: 1
name: caller
steps:
  - {id: triage, type: flow, flow: sub.yaml, result: triage}
  - {id: use, type: set, values: {a: "${triage.labl}", b: "${steps.triage.outputs.label}"}}
""")
    out = run_cli("validate", str(flow))
    assert out.returncode == 1
    err = out.stdout + out.stderr
    assert "flow.yaml:6:39: steps[1].values.a: ${triage.labl}: " in err, err
    assert "did you mean 'label'?" in err and "outputs.label" not in err and "1 problem(s)" in err


def test_a_cycle_of_sub_flows_is_a_load_error_showing_the_path(write_flow) -> None:
    write_flow("version: 1\nname: a\nsteps:\n  - {id: to_b, type: flow, flow: b.yaml}\n", "a.yaml")
    write_flow("version: 1\nname: b\nsteps:\n  - {id: to_c, type: flow, flow: sub/c.yaml}\n", "b.yaml")
    sub = write_flow("", "x")  # the folder's path
    (sub.parent / "sub").mkdir()
    (sub.parent / "sub" / "c.yaml").write_text("version: 1\nname: c\nsteps:\n  - {id: back, type: flow, flow: ../a.yaml}\n")
    out = run_cli("validate", str(sub.parent / "a.yaml"))
    assert out.returncode == 1
    err = out.stdout + out.stderr
    assert "'../a.yaml' calls back into a flow that is calling it: a.yaml -> b.yaml -> sub/c.yaml -> a.yaml" in err
    assert "c.yaml:4:34: steps[0].flow" in err  # at the call that closes the cycle, in its own file
    assert "in the sub-flow called from" in err and "Traceback" not in err


def test_a_sub_flow_in_a_folder_of_flows_is_loaded_once(tmp_path: Path) -> None:
    """`validate DIR`: the callers of one sub-flow share its loaded copy (flow/nested.py caches by file)."""
    import flowrunner.flow.nested as nested
    from flowrunner.flow.build import load_flow

    (tmp_path / "sub.yaml").write_text("version: 1\nname: s\nsteps:\n  - {id: s, type: set, values: {v: 1}}\n")
    for i in range(3):
        (tmp_path / f"caller{i}.yaml").write_text(f"version: 1\nname: c{i}\nsteps:\n  - {{id: c, type: flow, flow: sub.yaml}}\n")
    loaded = [load_flow(tmp_path / f"caller{i}.yaml") for i in range(3)]
    subs = {id(flow.steps[0].nested) for flow in loaded}
    assert len(subs) == 1
    (tmp_path / "sub.yaml").write_text("version: 1\nname: s2\nsteps:\n  - {id: s, type: set, values: {v: 2}}\n")
    assert load_flow(tmp_path / "caller0.yaml").steps[0].nested.name == "s2"  # a changed file is read again
    assert nested._CACHE


def test_the_example_streams_the_reply_while_a_sub_flow_labels_it(llm) -> None:
    """The README's two command lines for flows/support_reply.yaml, as printed."""
    llm.responder = lambda request: Reply(text="billing" if request.json.get("stream") is not True
                                          else "Sorry about that. We will refund the second charge.")
    message = "message=I was charged twice this month"
    out = run_cli("run", "flows/support_reply.yaml", "-i", message, env=_env(llm))
    assert out.returncode == 0, out.stderr
    # Only the streamed reply reaches the screen: the label's one piece is kept off it.
    assert out.stdout == "Sorry about that. We will refund the second charge.\n"
    seq = events(run_cli("run", "flows/support_reply.yaml", "-i", message, "--sink", "jsonl:-", env=_env(llm)).stdout)
    assert {e["step"] for e in seq if e["event"] == "text"} == {"draft"}
    assert ("step_finished", "triage/classify") in [(e["event"], e.get("step")) for e in seq]
    assert seq[-1]["outputs"] == {"label": "billing", "reply": "Sorry about that. We will refund the second charge."}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    printed = 'flowrunner run flows/support_reply.yaml -i message="I was charged twice this month"'
    assert f"{printed}\n" in readme and f"{printed} --sink jsonl:-\n" in readme


def test_rag_chat_answers_from_a_canned_text_when_nothing_is_found(pg, llm) -> None:
    """The seed flow with an empty docs table: no model call for the answer, the canned text is the
    answer and is saved to the history as the turn; with passages, the model answers."""
    env = {**pg.env, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.base_url}
    (pg.root / "history.sqlite3").unlink(missing_ok=True)
    assert run_cli("run", "flows/ingest_docs.yaml", env=env).returncode == 0
    pg.execute("DELETE FROM documents")
    out = run_cli("run", "flows/rag_chat.yaml", "-i", "question=What does pgvector add?", "-i",
                  "conversation_id=empty", "--sink", "jsonl:-", env=env)
    assert out.returncode == 0, out.stderr
    seq = events(out.stdout)
    finished = {e["step"]: e for e in seq if e["event"] == "step_finished"}
    assert finished["retrieve"]["outputs"]["count"] == 0
    assert finished["answer"]["status"] == "skipped" and finished["no_context"]["status"] == "ok"
    assert finished["remember"]["status"] == "ok"
    assert seq[-1]["outputs"]["answer"] == "I could not find that in the docs."
    assert llm.chat_requests == []
    db = sqlite3.connect(pg.root / "history.sqlite3")  # the flow's embedded history file
    saved = db.execute("SELECT role, content FROM chat_history WHERE conversation_id = 'empty' ORDER BY seq").fetchall()
    db.close()
    assert saved == [("user", "What does pgvector add?"), ("assistant", "I could not find that in the docs.")]
    # With passages the model answers; when it fails before any text, the question alone is still saved.
    assert run_cli("run", "flows/ingest_docs.yaml", env=env).returncode == 0
    llm.script(Reply(status=400, error="no such model"))
    broken = run_cli("run", "flows/rag_chat.yaml", "-i", "question=And pgvector?", "-i", "conversation_id=broken",
                     "--sink", "jsonl:-", env=env)
    assert broken.returncode == 1, broken.stderr
    ends = {e["step"]: e for e in events(broken.stdout) if e["event"] == "step_finished"}
    assert ends["no_context"]["status"] == "skipped" and ends["answer"]["status"] == "failed"
    assert ends["remember"]["status"] == "ok" and ends["remember"]["outputs"]["status"] == "partial"
    db = sqlite3.connect(pg.root / "history.sqlite3")
    saved = db.execute("SELECT role, content FROM chat_history WHERE conversation_id = 'broken'").fetchall()
    db.close()
    assert saved == [("user", "And pgvector?")]


def test_for_each_and_when_work_on_flow_and_parallel_steps(write_flow) -> None:
    """The engine's `for_each` and `when` (issue 14's other half) on the two step types of this file."""
    write_flow("""
version: 1
name: shout
inputs:
  word: {type: string}
steps:
  - {id: s, type: set, values: {loud: "${inputs.word}!"}}
outputs:
  loud: ${loud}
""", "shout.yaml")
    flow = write_flow("""
version: 1
name: loops
inputs:
  words: {type: array, default: [a, b, c]}
  skip: {type: boolean, default: true}
steps:
  - id: each
    type: flow
    flow: shout.yaml
    for_each: ${inputs.words}
    concurrency: 2
    inputs: {word: "${item}"}
    result: shouted
  - id: maybe
    type: parallel
    when: {value: "${inputs.skip}", equals: false}
    steps:
      - {id: p1, type: set, values: {one: 1}}
      - {id: p2, type: set, values: {two: 2}}
outputs:
  shouted: ${shouted}
  one: ${steps.maybe.p1}
""")
    out = run_cli("run", str(flow), "--output", "json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["shouted"] == [{"loud": "a!"}, {"loud": "b!"}, {"loud": "c!"}]
    assert result["one"] is None  # the group was skipped
    ran = run_cli("run", str(flow), "-i", "skip=false", "--output", "json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["one"] == {"one": 1}


def test_a_group_stopped_by_its_timeout_ends_each_branch_with_what_it_had(write_flow, llm) -> None:
    """The group's timeout stops its branches: the streaming one ends `cancelled` with its text so far
    bound (a run_on_failure step reads it), the finished one keeps its outputs, both are the group's."""
    llm.script(Reply(text="one two three four five six seven eight", stall_after=3, stall=60))
    flow = write_flow(f"""
version: 1
name: stopped
{LLM}
steps:
  - id: both
    type: parallel
    timeout: 5                       # long enough for the first words to arrive, even on a busy machine
    steps:
{_chat("talk", "hi")}      - {{id: quick, type: set, values: {{x: 1}}}}
  - {{id: after, type: set, run_on_failure: true, values: {{seen: "${{talk_text}}"}}}}
""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env=_env(llm))
    assert out.returncode == 1, out.stderr
    seq = events(out.stdout)
    finished = {e["step"]: e for e in seq if e["event"] == "step_finished"}
    said = "".join(e["text"] for e in seq if e["event"] == "text")
    assert said and finished["talk"]["status"] == "cancelled"
    assert finished["talk"]["outputs"]["text"] == said
    assert finished["both"]["status"] == "failed" and "timed out" in finished["both"]["error"]
    assert finished["both"]["outputs"] == {"talk": finished["talk"]["outputs"], "quick": {"x": 1}}
    assert [e["step"] for e in seq if e["event"] == "step_finished"][-3:] == ["talk", "both", "after"]
    assert finished["after"]["outputs"] == {"seen": said}


def test_a_looped_group_sees_its_item_and_keeps_each_items_outputs_apart(write_flow) -> None:
    """for_each on a parallel step, items at once: its branches read ${item}; the group's outputs are
    per item, in input order; after it, a branch's own outputs and variables are the last item's."""
    flow = write_flow("""
version: 1
name: looped-group
inputs:
  xs: {type: array, default: [1, 2, 3, 4, 5, 6]}
steps:
  - id: g
    type: parallel
    for_each: ${inputs.xs}
    concurrency: 6
    steps:
      - {id: a, type: set, values: {va: "${item}"}}
      - {id: b, type: set, values: {vb: "${item_index}"}}
outputs:
  all: ${steps.g.a}
  last_a: ${va}
  last_b: ${steps.b.vb}
""")
    out = run_cli("run", str(flow), "--output", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"all": [{"va": x} for x in range(1, 7)], "last_a": 6, "last_b": 5}


def test_a_looped_branch_whose_item_fails_does_not_stop_its_siblings(write_flow, llm) -> None:
    """A branch with for_each and on_item_failure: continue: a failed item is not the branch failing."""
    llm.responder = _by_prompt({"bad": Reply(status=400, error="no"), "good": Reply(text="fine"),
                                "other": Reply(text="still here", chunk_delay=0.05)})
    flow = write_flow(f"""
version: 1
name: item-fails
inputs:
  prompts: {{type: array, default: [bad, good]}}
{LLM}
steps:
  - id: both
    type: parallel
    steps:
      - {{id: each, type: chat_completion, connection: llm, model: m, user_prompt: "${{item}}", stream: false,
         for_each: "${{inputs.prompts}}", on_item_failure: continue}}
{_chat("other", "other")}""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env=_env(llm))
    assert out.returncode == 0, out.stderr
    finished = {e["step"]: e for e in events(out.stdout) if e["event"] == "step_finished" and e["item"] is None}
    assert finished["other"]["status"] == "ok" and finished["other"]["outputs"]["text"] == "still here"
    assert finished["each"]["outputs"]["text"] == [None, "fine"]


def test_a_sub_flows_history_load_has_its_own_place_in_a_recording(write_flow, llm, tmp_path: Path) -> None:
    """--record keys a history load by step id: the caller's `recall` and its sub-flow's `recall` (run at
    the same time) are told apart as `recall` and `sub/recall`, and --replay gives each its own."""
    history = f'history: {{type: sqlite, path: "{tmp_path / "h.sqlite3"}"}}'
    write_flow(f"""
version: 1
name: inner
connections:
  {history}
steps:
  - {{id: recall, type: history_load, connection: history, conversation_id: inner, create: true}}
outputs:
  n: ${{steps.recall.count}}
""", "inner.yaml")
    flow = write_flow(f"""
version: 1
name: outer
connections:
  {history}
  llm: {{type: openai, api_key: "${{env.OPENAI_API_KEY}}", base_url: "${{env.OPENAI_BASE_URL}}"}}
steps:
  - {{id: seed, type: history_save, connection: history, conversation_id: inner, user_prompt: hi, response: yo,
     create: true}}
  - id: both
    type: parallel
    steps:
      - {{id: recall, type: history_load, connection: history, conversation_id: outer}}
      - {{id: sub, type: flow, flow: inner.yaml, result: inner}}
  - {{id: answer, type: chat_completion, connection: llm, model: m, user_prompt: hi}}  # a recording needs a model call
outputs:
  outer: ${{steps.recall.count}}
  inner: ${{inner.n}}
""")
    tape = tmp_path / "tape.jsonl"
    live = run_cli("run", str(flow), "--record", str(tape), "--output", "json", env=_env(llm))
    assert live.returncode == 0, live.stderr
    assert json.loads(live.stdout) == {"outer": 0, "inner": 2}
    records = [json.loads(line) for line in tape.read_text().splitlines()]
    assert sorted(r["step"] for r in records if r.get("kind") == "history") == ["recall", "sub/recall"]
    again = run_cli("run", str(flow), "--replay", str(tape), "--output", "json", env=_env(llm))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"outer": 0, "inner": 2}


def test_a_skipped_group_skips_its_branches_and_reading_them_warns(write_flow) -> None:
    """A `when` on a parallel step: skipped, its branches' outputs and variables read null after it
    (not an error), and `validate` warns at each such read."""
    flow = write_flow("""
version: 1
name: skipped-group
inputs:
  go: {type: boolean, default: false}
steps:
  - id: maybe
    type: parallel
    when: {value: "${inputs.go}", equals: true}
    steps:
      - {id: p1, type: set, values: {one: 1}}
      - {id: p2, type: set, values: {two: 2}}
  - {id: after, type: set, values: {a: "${one}", b: "${steps.p2.two}"}}
outputs:
  a: ${a}
  b: ${b}
""")
    checked = run_cli("validate", str(flow))
    assert checked.returncode == 0, checked.stdout
    warned = [line for line in checked.stdout.splitlines() if line.startswith("Warning:")]
    assert len(warned) == 2 and f"{flow.name}:13:41:" in warned[0] and "variable 'one'" in warned[0]
    assert "step 'p2' is a branch of parallel step 'maybe', which has a `when`" in warned[1]
    skipped = run_cli("run", str(flow), "--output", "json")
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout) == {"a": None, "b": None}
    assert "Warning: " in skipped.stderr  # `run` shows the load-time warnings too
    ran = run_cli("run", str(flow), "-i", "go=true", "--output", "json")
    assert json.loads(ran.stdout) == {"a": 1, "b": 2}


def test_a_looped_branch_stopped_by_a_failing_sibling_does_not_interrupt_the_run(write_flow, llm) -> None:
    """Its items run in tasks of their own: stopped with their branch, they are not the run being
    interrupted (exit 1 with the sibling's error, not 130), and the branch ends `cancelled`."""
    never = threading.Event()
    llm.responder = _by_prompt({"bad": Reply(status=400, error="refused"), "slow": Reply(text="never", hold=never)})
    flow = write_flow(f"""
version: 1
name: looped-sibling
{LLM}
steps:
  - id: both
    type: parallel
    steps:
      - {{id: each, type: chat_completion, connection: llm, model: m, user_prompt: "${{item}}", for_each: [slow]}}
{_chat("broken", "bad", stream=False)}""")
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env=_env(llm))
    never.set()
    assert out.returncode == 1, out.stderr
    seq = events(out.stdout)
    ends = {e["step"]: e for e in seq if e["event"] == "step_finished" and e["item"] is None}
    assert ends["each"]["status"] == "cancelled" and ends["broken"]["status"] == "failed"
    assert seq[-1]["status"] == "failed" and "refused" in seq[-1]["error"]
