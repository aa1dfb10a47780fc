# The two commands of the README: `make run` serves the API, `make test` runs the whole suite.
# Both install exactly the versions uv.lock names into .venv on first use (and whenever
# pyproject.toml or uv.lock changes), with uv itself installed by pip into .uv, pinned: a
# fresh machine needs nothing but Python 3.11+ and make.

PYTHON ?= python3
UV_VERSION := 0.13.10
VENV := .venv
BIN := $(VENV)/bin
UV := .uv/bin/uv
STAMP := $(VENV)/.installed
# uv uses the Python that runs make, never one it would download.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test lint mutants model-check lock lock-check clean

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet 'uv==$(UV_VERSION)'

# --locked: refuses, rather than resolves anew, when uv.lock no longer matches pyproject.toml.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked
	touch $(STAMP)

run: $(STAMP)  ## Serve on http://127.0.0.1:8000 (SQLite by default, migrations applied at start-up)
	$(BIN)/python -m app

test: $(STAMP)  ## The whole suite: memory, SQLite and a throwaway PostgreSQL the tests start
	$(BIN)/pytest $(PYTEST_ARGS)

mutants: $(STAMP)  ## Named mutations of the credit code and SQL; every one must fail the tests
	$(BIN)/python -m tests.mutants

model-check: $(STAMP)  ## The system state machine, longer than the suite runs it (both databases)
	MODEL_EXAMPLES=$${MODEL_EXAMPLES:-200} SYSTEM_STEPS=$${SYSTEM_STEPS:-40} \
		$(BIN)/pytest -p no:cacheprovider tests/test_system_model.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app tests
	$(BIN)/ruff format --check app tests
	$(BIN)/mypy app
	$(BIN)/lint-imports

lock: | $(UV)  ## Refresh uv.lock: the newest versions pyproject.toml's ranges allow (docs/operations.md, "Upgrading a dependency")
	$(UV) lock --upgrade

lock-check: | $(UV)  ## Fail when uv.lock does not match pyproject.toml (CI runs it first)
	$(UV) lock --check

clean:
	rm -rf $(VENV) .uv .pytest_cache .mypy_cache .ruff_cache
