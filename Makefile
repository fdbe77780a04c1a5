# pcee: two commands for a new user: `make demo` (the main job) and `make test` (the tests).
# Each installs what it needs (uv with pip if missing, then `uv sync --locked`).
SHELL := /bin/bash
.DEFAULT_GOAL := help

STATE_DIR ?= $(CURDIR)/.pcee
export PCEE_STATE_DIR := $(STATE_DIR)
# Quiet, self-contained runs (see ../shared/STACK.md)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
export PREFECT_HOME := $(STATE_DIR)/prefect
export MPLCONFIGDIR := $(STATE_DIR)/matplotlib
export DVC_SITE_CACHE_DIR := $(STATE_DIR)/dvc-site-cache
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_RUNNER_POLL_FREQUENCY := 2
# This environment sets PYTHONDONTWRITEBYTECODE=1 (../shared/STACK.md): then every process (each test
# worker, server, flow run) recompiled the project's sources and pytest re-rewrote every test module.
# Caching bytecode (__pycache__/, git-ignored) saves about a second of CPU per process.
unexport PYTHONDONTWRITEBYTECODE

UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTEST_ARGS ?=
# parallel test workers (pytest-xdist); tests sharing a server fixture run on one (tests/conftest.py)
TEST_WORKERS ?= 3

.PHONY: help setup lint test demo clean up down status
help:
	@echo "make demo   - set up, train a multi-exit network on digits, then the closed loop: serve, shift, drift event, recalibrated champion"
	@echo "make test   - set up, lint (ruff, pyright) and run the test suite"
	@echo "make lint   - ruff check, ruff format --check, pyright, lint-imports (import contracts)"
	@echo "make up     - start Prefect, MLflow, the deployments process and, once a champion exists, the HTTP replicas behind HAProxy, under supervisord (127.0.0.1, state in $(STATE_DIR))"
	@echo "make down   - stop what make up started"
	@echo "make status - show the services, their health and restarts (scripts/services.py restart|stop NAME acts on one)"

.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || [ -x "$(HOME)/.local/bin/uv" ] || python3 -m pip install --user --quiet uv
	$(UV) sync --locked --all-extras --compile-bytecode
	@touch $@

setup: .venv/.synced
	@$(UV) run --locked python -m compileall -q -j 0 src flows tasks monitoring scripts >/dev/null  # once, not per worker
	@bash scripts/ensure_postgres.sh  # PostgreSQL server binaries (PCEE_DB=postgres, tests/scale); a no-op when installed
	@bash scripts/ensure_haproxy.sh  # HAProxy: the load balancer in front of the HTTP replicas; a no-op when installed

# lint: ruff (lint rules and formatting, pyproject's [tool.ruff]), pyright (basic mode, src/) and the import contracts
# (pyproject's [tool.importlinter]: the layering of docs/architecture.md, no cycles); make test runs it first
lint: setup
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .
	$(UV) run --locked pyright
	$(UV) run --locked lint-imports --no-cache

test: setup lint
	$(UV) run --locked pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=10 $(PYTEST_ARGS)

# demo: train the champion (scripts/demo.py), then the closed loop (scripts/closed_loop_demo.py): serve on
# PCEE_SERVE_PORT (8000), clean then shifted traffic, drift event -> automation -> recalibrated champion.
demo: up
	$(UV) run --locked python scripts/demo.py
	$(UV) run --locked python scripts/closed_loop_demo.py

# Services (scripts/services.py, the service manager of dev/: pcee_dev.services): ports PCEE_PREFECT_PORT
# (4200), PCEE_MLFLOW_PORT (5000), PCEE_SERVE_PORT (8000, the load balancer); every service runs under
# supervisord, which restarts it when it dies. `scripts/services.py restart NAME` / `stop NAME`.
up: setup
	$(UV) run --locked python scripts/services.py up

down:
	@if [ -x .venv/bin/python ]; then .venv/bin/python scripts/services.py down; else echo "nothing to stop (no .venv)"; fi

status:
	@.venv/bin/python scripts/services.py status

clean:
	rm -rf $(STATE_DIR)

# Evidence (issue 6): every experiment of benchmarks/evidence/ plus the other benchmark scripts,
# logged to the MLflow experiment "evidence"; writes reports/evidence.md and reports/figures/.
# BENCH_ARGS=--quick for a smoke run; e.g. BENCH_ARGS="--only control shift --skip-others".
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(UV) run --locked python benchmarks/evidence/run_all.py $(BENCH_ARGS)
