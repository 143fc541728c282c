# cytofed: `make run` trains on the embedded synthetic clinics, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
BIN := $(VENV)/bin
# Flower's home (installed app bundles) stays inside the project.
export FLWR_HOME := $(CURDIR)/.flwr
# The app's dependencies are installed in .venv: no per-run `uv sync` into a fresh environment
# (whose imports then compile every module anew). Read when the local SuperLink starts.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PATH := $(BIN):$(PATH)
RUN_CONFIG ?=
SUPERNODES ?= 3

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install run test lint
install: $(VENV)/.installed

# The local SuperLink gets free ports and is stopped, with everything the run started, by
# process id when the run ends (simulations/local_run.py): checkouts never share one.
run: $(VENV)/.installed
	$(BIN)/python -m simulations.local_run -- \
	  $(BIN)/flwr run . --stream --federation-config "num-supernodes=$(SUPERNODES) client-resources-num-cpus=1" \
	  --run-config "output-dir='$(CURDIR)/runs' cache-dir='$(CURDIR)/.cache/cytofed' $(RUN_CONFIG)"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
