# Every target that runs code first makes sure .venv/ holds the package and its test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo crds bench bench-daemon clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup lint
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check controller tests examples bench
	$(BIN)/mypy controller

demo: setup
	$(BIN)/python examples/demo.py

# Removal against the floor (N=2000 orphans, 50 leaked containers), then the planner at scale.
bench: setup
	$(BIN)/python bench/removal_bench.py
	$(BIN)/python bench/planner_scale.py

bench-daemon: setup
	$(BIN)/python bench/daemon_bench.py

# The CRD and the README's policy reference are generated from controller/policy.py.
crds: setup
	$(BIN)/python -m controller.crd

clean:
	rm -rf $(VENV) demo-run .pytest_cache .mypy_cache .ruff_cache
