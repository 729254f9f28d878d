# Every target is idempotent: it creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= smoke
PYTEST_ARGS ?=

.PHONY: setup serve run train test test-fast lint typecheck format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cpu,service,worker,onnx]'
	touch $(STAMP)

setup: $(STAMP)

## serve: set up, migrate the embedded SQLite database, start the API on http://127.0.0.1:8000
## with a training worker and the dispatcher (embedded broker: SQLite; no servers needed)
serve: $(STAMP)
	$(PY) -m service serve --with-worker

## train: set up, then train a preset (reid_core/presets/; default smoke: synthetic data, outputs/smoke)
train: $(STAMP)
	$(VENV)/bin/reid train --preset $(PRESET)

run: serve

## test: set up, lint, type-check, then the whole test suite
test: $(STAMP) lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

## test-fast: the suite without tests marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## lint: ruff, then the import contracts (which folder may import which: pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## bench: the benchmarks that need no external data (train_real needs REID_BENCH_DATA)
bench: $(STAMP)
	$(PY) bench/eval_speed.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
