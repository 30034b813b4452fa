# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: run test lint bench loadtest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so the project's range (torch>=2.5) installs nothing more.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q "torch>=2.5"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# `make run UP_ARGS="--port 9000 --model small"` passes flags to `bwr up`.
run: $(STAMP)
	$(BIN)/bwr up $(UP_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# `make loadtest USERS=200 SPAWN_RATE=50 DURATION=60` (env BWR_* sets the mix; README.md).
USERS ?= 50
SPAWN_RATE ?= 25
DURATION ?= 60
loadtest: $(STAMP)
	USERS=$(USERS) SPAWN_RATE=$(SPAWN_RATE) DURATION=$(DURATION) $(BIN)/python -m loadtest.run

clean:
	rm -rf $(VENV) .data
