# flowrunner: the two commands of the README, and their helpers.
#   make demo   install what is needed, then run the main job
#   make test   install what is needed, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= 2.13.0

SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install system demo test bench schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first, pinned to the CPU build: otherwise sentence-transformers pulls CUDA packages.
	$(BIN)/python -m pip install --quiet 'torch==$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[test,local]'
	@# An editable install leaves no bytecode (and PYTHONDONTWRITEBYTECODE may forbid writing it
	@# later): compile it now, as pip does for a regular install, so start-up is fast.
	$(BIN)/python -m compileall -q flowrunner
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowrunner run flows/hello.yaml -i name=flowrunner

# The ODBC driver manager and psqlODBC: the sqlserver connection's pyodbc code path runs for real
# against the test PostgreSQL through them (no SQL Server can run here).
system:
	@odbcinst -q -d 2>/dev/null | grep -q 'PostgreSQL Unicode' || { \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q unixodbc odbc-postgresql; }

test: system $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/startup.py

schema: $(STAMP)
	$(BIN)/flowrunner schema > schemas/flow.schema.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
