# Quick start: `make demo` (train a small model on toy cars and draw every figure)
# and `make test`. Both create .venv when it is missing: the demo installs the package
# with its runtime dependencies alone, the tests (and `make install`) add the dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: demo test lint install clean kill-campaign

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# --no-compile: the demo imports a small part of torch, so byte-compiling all of it at install
# time (about 25 s of a 2-core machine) is left to Python's first import of each module
$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e .
	touch $(RUNTIME)

# the dev extras hold the runtime dependencies too
$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV) $(RUNTIME)

install: $(DEV)

demo: $(RUNTIME)
	$(BIN)/ddpm-cars demo

# one test worker per core (at most 4), each test file on one worker (its trained fixtures built once)
test: $(DEV)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# the code's format and lint rules (pyproject.toml's [tool.ruff]); CI runs it before the tests
lint: $(DEV)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# a study (studies/, beside the package): run from the repository root, the package installed
kill-campaign: $(RUNTIME)
	$(BIN)/python -m studies.kill_campaign --kills 20

clean:
	rm -rf $(VENV) runs .pytest_cache
