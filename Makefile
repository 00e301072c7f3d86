# The README's commands: `make demo`, `make test` and `make test-fast`. All create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch lies on this environment's disk; an unpinned `torch` would pull
# a multi-GB CUDA build. pyproject keeps a range (torch>=2.6); override for other machines:
#   make test TORCH_SPEC='torch>=2.6'
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench detection docs grafana clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

demo: $(STAMP)
	$(BIN)/monitor demo

# scripts/provision.sh (also .ci/run's) installs Prometheus, promtool and Alertmanager when it can
# (root with apt-get), else says what is missing: the tests that need them are then skipped, counted.
test: $(STAMP)
	bash scripts/provision.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Everything that neither trains the reference trainer, starts a subprocess or server, nor runs a
# framework's Trainer (those are marked `slow`): the tier to run while changing code.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/publisher.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/watch.py

detection: $(STAMP)
	$(BIN)/python benchmarks/detection.py

docs: $(STAMP)
	$(BIN)/monitor rules --markdown > docs/rules.md
	$(BIN)/monitor config --markdown > docs/config.md

# grafana/ (dashboards, provisioning, Prometheus rules/tests/config) is generated; a test diffs it.
grafana: $(STAMP)
	rm -rf grafana
	$(BIN)/python -m monitor.exporters.grafana grafana/

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
