# Developer entry points. Everything runs from the project's own venv in .venv/.
#   make run    Airflow (UI on http://127.0.0.1:8080) + the demo API, Ctrl-C stops all
#   make test   the test suite, without the distributed and reliability tests
#   make test-distributed  the CeleryExecutor topology (PostgreSQL + Redis) run natively, with its tests
#   make test-distributed-scale  600 mapped requests on that topology (~13 min, not in CI)
#   make test-reliability  fault injection, hostile input, secrets, kills (docs/reliability.md)
#   make bench  the throughput benchmark (bench/README.md); not part of the tests
#   make bench-scale  how the cost of N = 60, 600, 3,000 requests grows (bench/README.md), about an hour

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
REQUIREMENTS := requirements.txt requirements-dev.txt requirements-distributed.txt constraints.txt
PYTEST_MARKERS := not distributed and not reliability

.PHONY: venv run test test-distributed test-reliability bench constraints clean

venv: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when a requirements or constraints file changed.
$(VENV)/.installed: $(REQUIREMENTS) | $(BIN)/python
	$(BIN)/python -m pip install -r requirements-dev.txt -r requirements-distributed.txt -c constraints.txt
	touch $@

run: venv
	$(BIN)/python scripts/run_embedded.py

# Two pytest-xdist workers (each with its own Airflow home), then the tests that start Airflow
# processes of their own (marker stack), one at a time: two stacks on a 2-core machine would
# slow each other past their timeouts.
test: venv
	$(BIN)/pytest -n 2 -m "$(PYTEST_MARKERS) and not stack" tests/
	$(BIN)/pytest -m "$(PYTEST_MARKERS) and stack" tests/

# The CeleryExecutor topology run natively, with end-to-end tests in it (docs/distributed.md).
test-distributed: venv
	$(BIN)/pytest -m "distributed and not scale" tests/distributed -x

# 600 mapped requests over the two Celery workers with the Redis gate (issue 12), about 13 minutes.
.PHONY: test-distributed-scale
test-distributed-scale: venv
	$(BIN)/pytest -m "distributed and scale" tests/distributed -x -s

# Faults injected into a real embedded stack: killed scheduler/task, API down or hanging,
# huge or dripping bodies, hostile input, secrets (docs/reliability.md).
test-reliability: venv
	$(BIN)/pytest -m reliability tests/reliability

# Three strategies under a rate-limited API through a real scheduler (bench/README.md).
# BENCH_ARGS="--shape both" adds the fixed-window API (~8-13 min).
bench: venv
	$(BIN)/python bench/run_bench.py $(BENCH_ARGS)

# How the cost grows with N (issue 12): 60, 600 and 3,000 requests at 10/s, each strategy on a
# fresh stack (bench/README.md, "Growth with N"); about an hour. Installs matplotlib for the plot.
# BENCH_SCALE_ARGS="--sizes 60 --strategies urllib3_retry" runs a part.
.PHONY: bench-scale
bench-scale: venv $(VENV)/.bench-installed
	$(BIN)/python bench/run_scale.py $(BENCH_SCALE_ARGS)

$(VENV)/.bench-installed: requirements-bench.txt constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -r requirements-bench.txt -c constraints.txt
	touch $@

# Re-resolve every pin in a throwaway venv and write them to constraints.txt, keeping its
# two-line header comment.
constraints:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -r requirements-dev.txt -r requirements-distributed.txt; \
	{ head -n 2 constraints.txt; "$$tmp/venv/bin/python" -m pip freeze; } > "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" constraints.txt

# Removes the venv, the `make run` state (.airflow/: database, logs, admin password) and caches.
clean:
	rm -rf $(VENV) .airflow .pytest_cache .hypothesis test-artifacts bench/runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
