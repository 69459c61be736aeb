# cdc-relay: every command installs what it needs first (a fresh Debian machine is enough).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help install postgres test test-unit test-faults lint format demo bench clean up down docs-config

help:
	@echo "make demo       start a local PostgreSQL and broker, stream sample events, stop everything"
	@echo "make test       install what is needed and run the whole suite"
	@echo "make test-unit  only the tests that need no servers"
	@echo "make test-faults the fault-injection suite at full size (docs/reliability.md)"
	@echo "make lint       ruff and mypy"
	@echo "make bench      the side-by-side benchmark (~5 min); writes docs/performance.md;"
	@echo "                BENCH_ARGS='--quick' for a fast look, '--help' for the options"
	@echo "make clean      remove the virtualenv and caches"
	@echo "make up         docker compose: PostgreSQL, Kafka (KRaft), cdc-relay setup and run"
	@echo "make down       stop them and remove their volumes"
	@echo "make docs-config  regenerate the README configuration table from the settings"

# PostgreSQL server binaries (initdb, pg_ctl) for the tests and the demo.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing the PostgreSQL server (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else \
		echo "PostgreSQL server binaries not found: run 'sudo apt-get install postgresql'" >&2; exit 1; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cdc-relay needs Python >= 3.11: run make PYTHON=python3.11 ...")'
	@# Debian splits venv out of python3: install it when we can.
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
		else \
			echo "python venv is missing: run 'sudo apt-get install python3-venv'" >&2; exit 1; \
		fi; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: postgres $(STAMP)

test: install
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# `make test` runs the same suite at CI size (CDC_RELAY_FAULTS_SCALE=ci, the default).
test-faults: install
	CDC_RELAY_FAULTS_SCALE=full $(PY) -m pytest -q -m faults tests/faults
	$(PY) -m tests.faults.results

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: install
	$(PY) examples/demo.py

up:
	docker compose up -d --build

down:
	docker compose down -v

docs-config: $(STAMP)
	$(PY) -m cdc_relay.settings_doc --write README.md

bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info build dist
