# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

UPLOT ?= uplot@1.6.32
VENDOR := web/static/vendor

.PHONY: run test lint bench loadtest clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so the project's range (torch>=2.5) installs nothing more.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q "torch>=2.5"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The page's charting library, fetched from npm once; the files are committed, so a checkout
# without npm (or without a network) already has them and this is a no-op.
$(VENDOR)/uPlot.iife.min.js:
	mkdir -p $(VENDOR)
	tmp=$$(mktemp -d) && cd $$tmp && npm pack -q $(UPLOT) >/dev/null && tar xzf uplot-*.tgz \
		&& cp package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE \
			$(CURDIR)/$(VENDOR)/ && rm -rf $$tmp

# The browser tests drive Debian's chromium (never a downloaded browser): installed when
# missing and we are root; otherwise tests/web skips.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi

install: $(STAMP) $(VENDOR)/uPlot.iife.min.js

# `make run UP_ARGS="--port 9000 --model small"` passes flags to `bwr up`.
run: $(STAMP) $(VENDOR)/uPlot.iife.min.js
	$(BIN)/bwr up $(UP_ARGS)

test: $(STAMP) $(VENDOR)/uPlot.iife.min.js browser
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
