# flowrunner: the two commands of the README, and their helpers.
#   make demo   install what is needed, then run the main job
#   make test   install what is needed, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= 2.13.0

.PHONY: install demo test bench schema clean

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

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/startup.py

schema: $(STAMP)
	$(BIN)/flowrunner schema > schemas/flow.schema.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
