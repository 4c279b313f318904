# metalearn: common commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real data: ../shared/data on the development machines, else data/ (downloaded).
export METALEARN_DATA_DIR ?= $(if $(wildcard ../shared/data/omniglot),$(abspath ../shared/data),$(CURDIR)/data)

.PHONY: help install train test test-full lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install metalearn with its dev tools

train: $(STAMP) ## Omniglot 5-way 1-shot on the CPU (< 10 min), then test: accuracy ± 95% CI
	$(PY) train.py experiment=omniglot_5w1s_quick

test: $(STAMP) ## the fast test suite (no `slow` tests)
	$(PY) -m pytest -m "not slow"

test-full: $(STAMP) ## every test, `slow` ones included
	$(PY) -m pytest

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP) ## apply ruff's formatting and fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP) ## speed benchmark of a meta-step (JSON lines)
	$(PY) bench/step_speed.py

clean: ## remove run folders and caches (not the venv)
	rm -rf logs outputs multirun .cache .pytest_cache .ruff_cache .mypy_cache
