# flowrunner: the two commands of the README, and their helpers.
#   make demo   install flowrunner, then run the main job (needs OPENAI_API_KEY or OPENAI_BASE_URL)
#   make test   install what the tests need, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNSTAMP := $(VENV)/.installed
STAMP    := $(VENV)/.installed-test
TORCH  ?= 2.13.0
CHAT_MODEL      ?= gpt-4o-mini
EMBEDDING_MODEL ?= text-embedding-3-small
QUESTION        ?= What does pgvector add to PostgreSQL, and how does flowrunner remember a conversation?

SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install system demo test bench schema clean

# Two installs: flowrunner alone (the demo), and with what the tests need (torch's CPU build for the
# offline embedding model, sentence-transformers, pytest...).
$(RUNSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@# An editable install leaves no bytecode (and PYTHONDONTWRITEBYTECODE may forbid writing it
	@# later): compile it now, as pip does for a regular install, so start-up is fast.
	$(BIN)/python -m compileall -q flowrunner
	touch $(RUNSTAMP)

$(STAMP): $(RUNSTAMP)
	@# torch first, pinned to the CPU build: otherwise sentence-transformers pulls CUDA packages.
	$(BIN)/python -m pip install --quiet 'torch==$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[test,local]'
	$(BIN)/python -m compileall -q flowrunner
	touch $(STAMP)

install: $(STAMP)

# The main job: the embedded PostgreSQL, this repo's docs ingested into pgvector, and a streamed
# answer that remembers the conversation (SQLite history). A model server is checked for first,
# before anything is installed.
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifeq ($(strip $(OPENAI_API_KEY)$(OPENAI_BASE_URL)),)
$(error Set OPENAI_API_KEY, or OPENAI_BASE_URL to an OpenAI-compatible server such as Ollama at http://localhost:11434/v1, then run make demo again)
endif
endif
demo: $(RUNSTAMP)
	$(BIN)/flowrunner run flows/ingest_docs.yaml -i model="$(EMBEDDING_MODEL)"
	$(BIN)/flowrunner run flows/rag_chat.yaml -i model="$(CHAT_MODEL)" -i embedding_model="$(EMBEDDING_MODEL)" \
	  -i question="$(QUESTION)"
	@# The server outlives make (the next run attaches at once): say so, and how to stop it.
	@echo
	@echo "The embedded PostgreSQL keeps running in the background for the next runs: $$($(BIN)/flowrunner db status)"
	@echo "Stop it with: $(BIN)/flowrunner db stop   (its data stays; the next run starts it again)"

# The ODBC driver manager and psqlODBC: the sqlserver connection's pyodbc code path runs for real
# against the test PostgreSQL through them (no SQL Server can run here).
system:
	@odbcinst -q -d 2>/dev/null | grep -q 'PostgreSQL Unicode' || { \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q unixodbc odbc-postgresql; }

test: system $(STAMP)
	$(BIN)/python -m pytest

bench: system $(STAMP)
	for b in startup chat_stream vector_search history batch_serve parallel_ttft serve_capacity; do $(BIN)/python bench/$$b.py || exit 1; done

schema: $(RUNSTAMP)
	$(BIN)/flowrunner schema > schemas/flow.schema.json
	$(BIN)/flowrunner steps --markdown reference/steps

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
