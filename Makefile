# deltavault: the two README commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint eval protos bench-store bench-load clean

# Torch first, pinned exactly: its local CPU wheel. An unpinned resolve pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,models,eval]'
	touch $@

install: $(STAMP)

demo: install
	$(PY) -m tests.e2e.demo

test: install lint
	$(PY) -m pytest

# docs/evaluation.md and its plots, every number measured by this run (~30 min on 2 cores);
# EVAL_ARGS="--quick" for the small variant CI runs.
eval: install
	$(PY) -m tests.eval --out docs $(EVAL_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

protos: install
	$(PY) -m clients.codegen

bench-store: install
	$(PY) -m tests.bench.bench_store

# 16 compress streams and 64 readers against one store for 60 s; e.g. LOAD_ARGS="--backend s3".
bench-load: install
	$(PY) -m tests.bench.bench_load $(LOAD_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
