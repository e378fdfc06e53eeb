# minillava: two commands for a fresh clone, `make train` and `make test`.
# Both create .venv if it is missing and install the package with its dev extra.
#
# torch is installed first, pinned: a bare `torch>=2.4` in a fresh venv would resolve to a
# multi-GB CUDA build on Linux. On a learner's Linux GPU machine the same pin pulls CUDA torch;
# override with e.g. `make train TORCH_VERSION=2.5.1`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_VERSION ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= cpu
# Whose functions run in the model: library, exercises (yours, where they pass their checks)
# or solutions. `make train PARTS=exercises` trains your parts (minillava/parts.py).
PARTS ?= library
# `make grade CH=03` grades chapter 3; HINT=1 adds a hint under each failure.
CH ?= 01

.PHONY: setup train test lint grade grade-all notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(BIN)/minillava train --preset $(PRESET) --parts $(PARTS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check minillava tests solutions

grade: setup
	$(BIN)/minillava grade ch$(CH) $(if $(HINT),--hint)

grade-all: setup
	$(BIN)/minillava grade all

notebooks: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf runs .pytest_cache .ruff_cache
