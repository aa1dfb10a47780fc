# The two commands of the README: `make run` serves the API, `make test` runs the whole suite.
# Both create .venv and install the project into it on first use (and when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint mutants model-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
