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

UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTEST_ARGS ?=

.PHONY: help setup test demo clean
help:
	@echo "make demo   - set up, train a multi-exit network on digits, print the per-exit table"
	@echo "make test   - set up and run the test suite"

.venv/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || [ -x "$(HOME)/.local/bin/uv" ] || python3 -m pip install --user --quiet uv
	$(UV) sync --locked --all-extras --compile-bytecode
	@touch $@

setup: .venv/.synced

test: setup
	$(UV) run --locked pytest $(PYTEST_ARGS)

demo: setup
	$(UV) run --locked pcee train --data digits --model small-cnn --regime mixed --epochs 30 --out $(STATE_DIR)/runs/demo

clean:
	rm -rf $(STATE_DIR)
