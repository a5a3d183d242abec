# Two entry points: `make demo` (the main job) and `make test` (what CI runs).
# Everything installs into ./.venv from PyPI; nothing else is needed but Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean protos bench bench-instructions

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/calloutkit demo

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Regenerate src/calloutkit/_generated/coprocess from proto/coprocess/*.proto (Tyk plugins).
protos: $(STAMP)
	$(BIN)/python -m calloutkit.tyk.codegen

# The side-by-side benchmark suite (bench/run.py; about 20 minutes on 2 cores). Load comes
# from wrk and h2load, installed from the system's packages when missing.
bench: $(STAMP)
	@command -v wrk >/dev/null && command -v h2load >/dev/null || \
		$$(command -v sudo) apt-get install -y --no-install-recommends wrk nghttp2-client
	$(BIN)/python -m pip install --quiet matplotlib uvloop
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Instructions per one-message stream under valgrind (bench/instructions.py; about 10
# minutes): the comparison with the floor that machine noise cannot move.
bench-instructions: $(STAMP)
	@command -v valgrind >/dev/null && command -v h2load >/dev/null || \
		$$(command -v sudo) apt-get install -y --no-install-recommends valgrind nghttp2-client
	$(BIN)/python -m pip install --quiet uvloop
	$(BIN)/python bench/instructions.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
