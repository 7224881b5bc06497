# The two commands that matter: `make run` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin

.PHONY: run test bench lint install install-test install-bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# After installing, the learners' compiled valuation is built into numba's cache once, here,
# rather than by the first server that makes 1,000 decisions (a background compile holds the GIL).
WARM := $(PY) -c "from cadence.engine import valuation; valuation.load_now()"

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	$(WARM)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	$(WARM)
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

## Set up, migrate the embedded SQLite database and serve on http://127.0.0.1:8000
run: install
	$(BIN)/cadence db upgrade
	$(BIN)/cadence serve

## Set up and run the whole suite on SQLite and on a throw-away PostgreSQL
# The browser suite runs in its own pytest process: Playwright's sync API keeps an event
# loop running in the main thread, which would break the asyncio tests sharing a worker.
test: install-test
	scripts/ensure-chromium.sh
	CADENCE_REQUIRE_POSTGRES=1 CADENCE_REQUIRE_BROWSER=1 scripts/with-postgres.sh sh -c '\
	  $(PY) -m pytest -n 2 --dist loadfile -q --ignore=tests/browser $(PYTEST_ARGS) && \
	  $(PY) -m pytest -q tests/browser $(PYTEST_ARGS)'

## Run the benchmarks and write docs/benchmarks.md
bench: install-bench
	scripts/with-postgres.sh $(PY) -m benchmarks $(BENCH_ARGS)

lint: install-test
	$(BIN)/ruff check cadence tests benchmarks
	$(BIN)/ruff format --check cadence tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
