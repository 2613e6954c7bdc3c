# The README's commands. CI runs `make test` (via .ci/run) on a fresh Debian 12
# machine, so every target brings what it needs with it.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# The set-up steps may each run apt-get, which takes a global lock: never in parallel.
.NOTPARALLEL:

.PHONY: install services chromium node lint test format bench \
	demo demo-stop demo-status clean cluster cluster-stop cluster-status bench-cluster

install: $(STAMP)

# Re-runs only when pyproject.toml changes. Debian's python3 cannot create a
# virtualenv until python3-venv is installed, so that is installed on demand.
$(STAMP): pyproject.toml
	@if [[ ! -x $(VENV)/bin/python ]]; then \
		echo "creating $(VENV) with $(PYTHON)"; \
		if ! $(PYTHON) -m venv $(VENV) >/dev/null 2>&1; then \
			rm -rf $(VENV); \
			echo "$(PYTHON) -m venv failed; installing python3-venv (apt-get)"; \
			apt-get -qq -o DPkg::Lock::Timeout=600 update; \
			DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 \
				install -y python3-venv >/dev/null; \
			$(PYTHON) -m venv $(VENV); \
		fi; \
	fi
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[dev]'
	@touch $@

services:
	scripts/ensure-services.sh

chromium:
	scripts/ensure-chromium.sh

node:
	scripts/ensure-node.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Prerequisites run left to right: set-up first, then lint, then the suite.
# Any pytest failure fails the target, including exit 5 (no tests collected).
test: install services chromium node lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Refresh the screenshots docs/letterthief.md and the README show (the browser test
# takes them; a plain test run writes them to a temporary folder instead).
.PHONY: screenshots
screenshots: install services chromium
	LETTERTHIEF_SCREENSHOTS=$(CURDIR)/docs/img $(VENV)/bin/pytest tests/letterthief/test_browser.py

bench: install
	scripts/ensure-services.sh
	$(VENV)/bin/python -m bench

# The order story under supervisor (scripts/demo.sh); LetterThief on http://127.0.0.1:8025.
# The demo needs only RabbitMQ, so it ensures only RabbitMQ (not Redis, PostgreSQL).
demo: install
	scripts/ensure-services.sh rabbitmq
	@scripts/demo.sh start

demo-status:
	@scripts/demo.sh status

demo-stop:
	@scripts/demo.sh stop

# Three private RabbitMQ nodes pigeon1..3@localhost on 5701-5703, joined into one
# cluster (scripts/cluster.sh); the machine's node on 5672 is never touched.
cluster:
	@scripts/cluster.sh start

cluster-status:
	@scripts/cluster.sh status

cluster-stop:
	@scripts/cluster.sh stop

# Dispatch and consume on the cluster against raw aio-pika there; rewrites only the
# cluster section of docs/performance.md. Starts (and then stops) the cluster if needed.
bench-cluster: install
	$(VENV)/bin/python -m bench.cluster

clean:
	rm -rf $(VENV) var .pigeon .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
