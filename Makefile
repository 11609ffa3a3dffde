# llm4all: `make reproduce` (every experiment's quick profile + figures) and `make test`.
# Both create .venv and install the pinned requirements on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline data root: $LLM4ALL_DATA if set, else ../shared/data when it exists (never copied into the repo).
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(origin LLM4ALL_DATA), undefined)
  ifneq ($(wildcard $(SHARED_DATA)/MANIFEST.md),)
    export LLM4ALL_DATA := $(SHARED_DATA)
  endif
endif
# Quick profiles need nothing from the hub; users with hub access can run `make ... HF_HUB_OFFLINE=0`.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PROFILE ?= quick

.PHONY: setup test lint reproduce figures bench clean-venv help

help:
	@echo "make reproduce   run every experiment's $(PROFILE) profile, then regenerate all figures"
	@echo "make test        run the test suite (pytest)"
	@echo "make figures     regenerate results/figures from results/results.csv"
	@echo "make bench       run the benchmarks (append rows to the results table)"
	@echo "make lint        ruff check ."
	@echo "data root: $(or $(LLM4ALL_DATA),<unset: set LLM4ALL_DATA>)"

$(STAMP): requirements.txt pyproject.toml scripts/setup_offline.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e . --config-settings editable_mode=compat
	bash scripts/setup_offline.sh $(BIN)/pip
	@touch $@

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

reproduce: $(STAMP)
	$(BIN)/python scripts/reproduce.py --profile $(PROFILE)
	$(BIN)/python results/make_figures.py

figures: $(STAMP)
	$(BIN)/python results/make_figures.py

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

clean-venv:
	rm -rf $(VENV)
