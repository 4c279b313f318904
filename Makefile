# metalearn: common commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
L2L_STAMP := $(VENV)/.installed-l2l
# The real data: ../shared/data on the development machines, else data/ (downloaded).
export METALEARN_DATA_DIR ?= $(if $(wildcard ../shared/data/omniglot),$(abspath ../shared/data),$(CURDIR)/data)

.PHONY: help install install-l2l train test test-full lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

# The tested versions (constraints.txt) within pyproject.toml's ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install metalearn with its dev tools

# learn2learn 0.2.0 must be rebuilt from its sdist on Python 3.11 (scripts/install_l2l.sh);
# the `l2l` extra holds its ordinary dependencies.
$(L2L_STAMP): $(STAMP) scripts/install_l2l.sh
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,l2l]'
	bash scripts/install_l2l.sh $(PY)
	touch $(L2L_STAMP)

install-l2l: $(L2L_STAMP) ## also install learn2learn 0.2.0 (optional: metalearn.data.l2l)

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
