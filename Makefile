# Quick start: `make demo` (train a small model on toy cars and draw every figure)
# and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean kill-campaign

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ddpm-cars demo

# one test worker per core (at most 4), each test file on one worker (its trained fixtures built once)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

kill-campaign: $(STAMP)
	$(BIN)/python -m ddpm_cars.benchmarks.kill_campaign --kills 20

clean:
	rm -rf $(VENV) runs .pytest_cache
