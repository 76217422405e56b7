"""Issue 17, items 13 and 16: I/O failures are clear errors with their exit code, and secrets never
leak, whatever shape they take.

Real processes throughout: a full disk is /dev/full (every write fails with ENOSPC), a closed stdout
is a pipe whose reader is gone, FIFOs are real FIFOs, the model is the local OpenAI-protocol server
and the database the test PostgreSQL. The masking itself is also tested unit by unit, one test per
shape a server may echo a secret in."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from flowrunner import secrets
from tests.conftest import ROOT, run_cli
from tests.support.chat_flows import chat_flow, openai_env
from tests.support.fixtures import Reply

CHAT = chat_flow("io-chat", inputs="  question: {type: string, default: Say something.}")

HELLO = """
version: 1
name: io-hello
inputs:
  name: {type: string, default: Ada}
steps:
  - {id: greet, type: set, values: {greeting: "Hello ${inputs.name}"}}
outputs:
  greeting: ${greeting}
"""

FAILURE_MARKS = ("internal error", "Traceback", "Exception ignored")


def cli_to(stdout: int | object, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
           pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process, its stdout going where a test says (a file descriptor)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("FLOWRUNNER_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "flowrunner", *args], cwd=cwd, env=full_env, text=True,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=60, pass_fds=pass_fds)


def to_full_disk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    with open("/dev/full", "w") as full:
        return cli_to(full, *args, env=env)


def to_closed_pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """stdout is a pipe nobody reads any more (`| head -c1` after head exited): every write is EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return cli_to(write_end, *args, env=env)
    finally:
        os.close(write_end)


def assert_clean(out: subprocess.CompletedProcess[str]) -> None:
    for mark in FAILURE_MARKS:
        assert mark not in out.stderr, out.stderr


@pytest.fixture
def model_env(llm) -> dict[str, str]:
    llm.script(Reply(text=["A streamed", " answer", " in words."]))
    return openai_env(llm)


# --- item 13: a full disk --------------------------------------------------------------------------

@pytest.mark.parametrize("sink, what", [
    (None, "cannot write stdout"),                     # the default sink, stdout redirected to a full disk
    ("jsonl:-", "cannot write stdout"),
    ("jsonl:/dev/full", "cannot write the events file /dev/full"),
    ("file:/dev/full", "cannot write the text file /dev/full"),
])
def test_every_sink_on_a_full_disk_is_a_clear_error_exit_1(write_flow, model_env, sink, what) -> None:
    flow = write_flow(CHAT)
    args = ("run", str(flow)) + (("--sink", sink) if sink else ())
    out = to_full_disk(*args, env=model_env) if sink in (None, "jsonl:-") else run_cli(*args, env=model_env)
    assert out.returncode == 1, out.stderr
    assert f"Error: {what}: No space left on device" in out.stderr
    assert "hint: the disk is full" in out.stderr
    assert_clean(out)


def test_printing_the_outputs_into_a_full_disk_is_a_clear_error(write_flow) -> None:
    flow = write_flow(HELLO)
    for args in (("run", str(flow)), ("run", str(flow), "--output", "json"), ("schema",)):
        out = to_full_disk(*args)
        assert out.returncode == 1, (args, out.stderr)
        assert "Error: cannot write stdout: No space left on device" in out.stderr
        assert_clean(out)


def test_record_and_batch_results_on_a_full_disk(write_flow, model_env, tmp_path) -> None:
    flow = write_flow(CHAT)
    out = run_cli("run", str(flow), "--record", "/dev/full", env=model_env)
    assert out.returncode == 1, out.stderr
    assert "--record: cannot write the recording /dev/full: No space left on device" in out.stderr
    assert_clean(out)

    hello = write_flow(HELLO, "hello.yaml")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"name": "a"}\n{"name": "b"}\n')
    out = run_cli("batch", str(hello), "--inputs", str(inputs), "--output", "/dev/full")
    assert out.returncode == 1, out.stderr
    assert "Error: cannot write the results file /dev/full: No space left on device" in out.stderr
    assert_clean(out)
    out = to_full_disk("batch", str(hello), "--inputs", str(inputs))  # results to stdout
    assert out.returncode == 1 and "Error: cannot write stdout: No space left on device" in out.stderr
    assert_clean(out)


# --- item 13: a closed stdout ----------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("run", "{chat}"),
    ("run", "{chat}", "--sink", "jsonl:-"),
    ("run", "{hello}"),
    ("run", "{hello}", "--output", "json"),
    ("batch", "{hello}", "--inputs", "{inputs}"),
    ("validate", "--format", "json", "{hello}"),
    ("schema",),
])
def test_a_closed_stdout_stops_quietly_with_141(write_flow, model_env, tmp_path, args) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"name": "a"}\n{"name": "b"}\n')
    paths = {"chat": write_flow(CHAT), "hello": write_flow(HELLO, "hello.yaml"), "inputs": inputs}
    out = to_closed_pipe(*(a.format(**paths) for a in args), env=model_env)
    assert out.returncode == 141, out.stderr
    assert "Error" not in out.stderr
    assert_clean(out)


# --- item 13: /dev/zero and FIFOs as file arguments ------------------------------------------------

@pytest.fixture
def fifo(tmp_path) -> str:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)  # nobody ever writes to it
    return str(path)


def test_dev_zero_as_any_file_argument_stops_at_the_size_limit(write_flow) -> None:
    flow = str(write_flow(CHAT))
    for args, limit in [(("run", "/dev/zero"), "10 MiB"),
                        (("run", flow, "--inputs-file", "/dev/zero"), "10 MiB"),
                        (("run", flow, "--connections", "/dev/zero"), "10 MiB"),
                        (("run", flow, "--replay", "/dev/zero"), "128 MiB")]:
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        option = next((a + ": " for a in args if a.startswith("--")), "")  # the option that named it, if any
        assert f"Error: /dev/zero: {option}the file is larger than {limit}" in out.stderr
        assert_clean(out)
    out = run_cli("validate", "/dev/zero")
    assert out.returncode == 1 and "/dev/zero: the file is larger than 10 MiB" in out.stdout
    assert_clean(out)


def test_a_fifo_nobody_writes_to_never_hangs(write_flow, fifo) -> None:
    flow = str(write_flow(CHAT))
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-unused"}
    for args in (("run", fifo), ("run", flow, "--inputs-file", fifo), ("run", flow, "--connections", fifo)):
        out = run_cli(*args, env=env)  # run_cli's timeout fails the test if it hangs
        assert out.returncode == 2 and f"{fifo}:1:1: the file is empty" in out.stderr, (args, out.stderr)
        assert_clean(out)
    out = run_cli("run", flow, "--replay", fifo, env=env)  # an empty recording: nothing to play
    assert out.returncode == 1 and "no recording left" in out.stderr
    out = run_cli("validate", fifo)
    assert out.returncode == 1 and "the file is empty" in out.stdout


def test_batch_inputs_must_be_a_regular_file(write_flow, fifo) -> None:
    flow = str(write_flow(HELLO))
    for path in ("/dev/zero", fifo):
        out = run_cli("batch", flow, "--inputs", path)
        assert out.returncode == 2, out.stderr
        assert f"{path}: --inputs: not a regular file" in out.stderr and "save the inputs to a file" in out.stderr


def test_inputs_from_a_pipe_are_read(write_flow) -> None:
    """`--inputs-file <(...)`: a pipe with a writer is read (up to the limit), not refused."""
    flow = write_flow(HELLO)
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, b'{"name": "Grace"}'), os.close(write_end)))
    writer.start()
    try:
        out = cli_to(subprocess.PIPE, "run", str(flow), "--inputs-file", f"/dev/fd/{read_end}", pass_fds=(read_end,))
    finally:
        writer.join()
        os.close(read_end)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello Grace\n"


# --- item 16: an API key with a line break ---------------------------------------------------------

KEY = "sk-proj-Tr4iling9Newline0Key"


@pytest.mark.parametrize("flow_names_the_key", [True, False])
def test_a_key_with_a_trailing_newline_is_stripped_and_never_shown(write_flow, llm, tmp_path,
                                                                   flow_names_the_key) -> None:
    text = CHAT if flow_names_the_key else CHAT.replace('api_key: "${env.OPENAI_API_KEY}", ', "")
    flow = write_flow(text)
    env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": f"  {KEY}\r\n"}
    llm.script(Reply(text="Fine."))
    events = tmp_path / "events.jsonl"
    out = run_cli("run", str(flow), "--sink", f"jsonl:{events}", env=env)
    assert out.returncode == 0, out.stderr
    assert llm.chat_requests[0].headers["authorization"] == f"Bearer {KEY}"
    for text in (out.stdout, out.stderr, events.read_text()):
        assert KEY not in text and "Illegal header" not in text


def test_a_key_with_a_line_break_inside_is_refused_before_any_request(write_flow, llm, tmp_path) -> None:
    flow = write_flow(CHAT)
    env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "sk-first-Half\nsecond-Half-of-it\n"}
    out = run_cli("run", str(flow), "--sink", f"jsonl:{tmp_path / 'ev.jsonl'}", env=env)
    assert out.returncode == 2, out.stderr
    assert (f"{flow}:7:33: connections.llm.api_key: the value of OPENAI_API_KEY contains a line break"
            in out.stderr)
    assert "first-Half" not in out.stderr + out.stdout and "second-Half" not in out.stderr + out.stdout
    assert llm.requests == []


def test_batch_with_a_newline_key_writes_no_key(write_flow, llm, tmp_path) -> None:
    flow = write_flow(CHAT)
    inputs, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text('{"question": "one"}\n{"question": "two"}\n')
    llm.script(Reply(text="One."), Reply(text="Two."))
    out = run_cli("batch", str(flow), "--inputs", str(inputs), "--output", str(results),
                  env={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": KEY + "\n"})
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["status"] for line in results.read_text().splitlines()] == ["ok", "ok"]
    assert KEY not in results.read_text() + out.stderr + out.stdout


def test_serve_with_a_newline_key_answers_and_shows_no_key(tmp_path, openai_server, llm) -> None:
    import httpx2

    flow = tmp_path / "served.yaml"
    flow.write_text(CHAT.replace("inputs:\n  question: {type: string, default: Say something.}",
                                 "inputs:\n  question: {type: string}"))
    env = {**os.environ, "OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": KEY + "\n"}
    env.pop("FLOWRUNNER_PLUGINS", None)
    proc = subprocess.Popen([sys.executable, "-m", "flowrunner", "serve", str(flow), "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("serving flow"):
                break
        url = re.search(r"at (http://\S+/v1)", lines[-1]).group(1)  # type: ignore[union-attr]
        llm.script(Reply(text="Served."))
        reply = httpx2.post(f"{url}/chat/completions", timeout=30,
                            json={"model": "io-chat", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "Served."
        assert KEY not in reply.text
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=10)[1]
    assert KEY not in "".join(lines) + rest


# --- item 16: validate never echoes a literal secret -----------------------------------------------

def test_validate_does_not_echo_a_secret_of_the_wrong_type(write_flow) -> None:
    flow = write_flow("""
version: 1
name: wrong-secrets
connections:
  llm: {type: openai, api_key: ["sk-literal-list-Secret-99"]}
  az: {type: azure_openai, endpoint: "https://x", api_key: {k: "sk-literal-map-Secret-98"}, azure_ad_token: 987654321012}
  pg: {type: postgres, dsn: ["postgresql://u:pw-Secret-97@h/db"]}
steps:
  - {id: s, type: set, values: {a: 1}}
""")
    for fmt in ("text", "json", "github"):
        out = run_cli("validate", "--format", fmt, str(flow))
        assert out.returncode == 1, out.stderr
        for value in ("sk-literal-list-Secret-99", "sk-literal-map-Secret-98", "987654321012", "pw-Secret-97"):
            assert value not in out.stdout + out.stderr, (fmt, out.stdout)
    out = run_cli("validate", str(flow))
    assert f"{flow}:5:32: connections.llm.api_key: expected a string, got a list (a secret: its value is not shown)" \
        in out.stdout
    assert "connections.pg.dsn: expected a string, got a list (a secret" in out.stdout
    assert "connections.az.azure_ad_token: expected a string, got an integer (a secret" in out.stdout


# --- item 16: every shape of a secret is masked ----------------------------------------------------

@pytest.fixture
def fresh_secrets():
    secrets.clear()
    yield secrets
    secrets.clear()


def test_a_key_with_surrounding_whitespace_is_masked_raw_and_escaped(fresh_secrets) -> None:
    key = "sk-live-Abc123Def456"
    secrets.register(f" {key}\n")
    assert secrets.redact(f"Illegal header value b'Bearer {key}\\n'") == "Illegal header value b'Bearer ***\\n'"
    assert secrets.redact(json.dumps({"k": key + "\n"})) == '{"k": "***\\n"}'
    assert key not in secrets.redact(repr(f"Bearer {key}\n"))


@pytest.mark.parametrize("dsn, password", [
    ("postgresql://alice:{enc}@db.example.com/app", "p@ss/w0rd x&y"),                   # URL userinfo
    ("postgresql://alice@db.example.com/app?sslmode=require&password={enc}", "s3cr&t+pw=1"),  # ?password=
    ("host=db user=alice password='{quoted}' dbname=app", "it's a secret"),               # libpq quoted
    ("DRIVER={{PostgreSQL Unicode}};SERVER=db;UID=alice;PWD={{{braced}}};DATABASE=app", "we}ird;pa=ss}"),  # ODBC {}}
    ("DRIVER={{PostgreSQL Unicode}};SERVER=db;UID=alice;PWD = two words here ;DATABASE=app", "two words here"),
])
def test_a_password_is_masked_in_every_spelling_a_server_echoes(fresh_secrets, dsn, password) -> None:
    written = dsn.format(enc=quote(password, safe=""), quoted=password.replace("'", "\\'"),
                         braced=password.replace("}", "}}"))
    secrets.register(written, whole=False)  # only the password part: what any connection field gets
    echoes = [password, quote(password, safe=""), quote(password, safe="").lower(), quote_plus(password),
              password.replace("}", "}}"), password.replace("'", "\\'"), password.replace("'", "''"),
              json.dumps(password)[1:-1], repr(password)[1:-1], re.sub(r"\s+", "  ", password),
              password.replace(" ", "\n")]
    for echo in echoes:
        shown = secrets.redact(f"FATAL: authentication failed for user alice with [{echo}] (retry)")
        assert "***" in shown and "alice" in shown, (echo, shown)
        assert shown.startswith("FATAL: authentication failed for user alice with [") and shown.endswith("] (retry)")
        assert password not in shown and echo not in shown, (echo, shown)


def test_a_message_is_masked_before_it_is_cut(fresh_secrets) -> None:
    key = "sk-live-Cut0ff1nTheMiddle"
    secrets.register(key)
    message = "the server said: " + "x" * 95 + key + " and more"
    assert len("the server said: " + "x" * 95) < 120 < len("the server said: " + "x" * 95 + key)
    short = secrets.shorten(message, 120)
    assert short == ("the server said: " + "x" * 95 + "*** and more")[:120] + "..."
    assert "sk-" not in short and "sk-" not in secrets.shorten(message, 114)  # cut inside where the key was


def test_a_server_echoing_the_key_encoded_shows_none_of_it(write_flow, llm) -> None:
    """End to end: the model server rejects the request and echoes the key URL-encoded, form-encoded and
    JSON-escaped (as proxies and gateways do); none of it reaches stdout or stderr."""
    key = "sk-Pl+us/Sl@sh=K\\ey'9"
    flow = write_flow(CHAT)
    llm.script(Reply(status=400, error=f"bad key [{quote(key, safe='')}] [{quote_plus(key)}] [{json.dumps(key)[1:-1]}] "
                                       f"[{re.sub('%..', lambda m: m.group().lower(), quote(key, safe=''))}]"))
    out = run_cli("run", str(flow), "--sink", "jsonl:-", env={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": key})
    assert out.returncode == 1, out.stderr
    assert "the request was rejected (400): bad key [***] [***] [***] [***]" in out.stderr
    for shape in (key, quote(key, safe=""), quote_plus(key), json.dumps(key)[1:-1], "Pl+us", "Pl%2Bus", "Sl%40sh"):
        assert shape not in out.stderr + out.stdout


def test_a_postgres_dsn_with_a_url_encoded_password_shows_the_user_but_no_password(write_flow, pg) -> None:
    """The server refuses an unknown user and says which; the password (URL-encoded in the dsn, and as
    ?password=) appears nowhere."""
    socket_dir = re.search(r"host=([^&]+)", pg.dsn).group(1)  # type: ignore[union-attr]
    password = "Pg p@ss%w0rd!"
    for dsn in (f"postgresql://nobody_here:{quote(password, safe='')}@/postgres?host={socket_dir}",
                f"postgresql://nobody_here@/postgres?host={socket_dir}&password={quote_plus(password)}"):
        flow = write_flow("""
version: 1
name: pg-secret
connections:
  db: {type: postgres, dsn: "${env.SECRET_DSN}"}
steps:
  - {id: recall, type: history_load, connection: db, conversation_id: c, create: true}
""")
        out = run_cli("run", str(flow), "--sink", "jsonl:-", env={"SECRET_DSN": dsn})
        assert out.returncode == 1, out.stderr
        assert 'role "nobody_here" does not exist' in out.stderr
        for shape in (password, quote(password, safe=""), quote_plus(password), "p@ss", "w0rd"):
            assert shape not in out.stderr + out.stdout, (dsn, shape)
