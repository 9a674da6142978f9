# Conveyor — developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
PROTO_FILES := $(wildcard protos/conveyor/v1/*.proto)
BENCH_ARGS ?=
# e.g. make bench BENCH_ARGS="--repeat 3" (medians of three runs) or "submit --quick"
REF ?=
SCENARIOS ?=
COMPARE_ARGS ?=
# e.g. make compare REF=origin/main SCENARIOS="end-to-end cost" COMPARE_ARGS="--pairs 5"

.PHONY: help install lock upgrade protos check-protos openapi check-openapi lint-protos lint typecheck test up down demo bench compare bench-tools clean
.PHONY: dashboard check-dashboard browser

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY) node_modules/.package-lock.json  ## create the venv and install Conveyor with its dev tools, at the locked versions
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check

# npm's tools (buf, and esbuild + TypeScript for the dashboard) at package-lock.json's versions,
# again only when the lock file changes; skipped without npm.
node_modules/.package-lock.json: package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --silent; fi

lock: $(PY)  ## re-resolve the lock files from pyproject.toml (keeps versions that still fit)
	$(PY) -m pip install -q 'pip-tools>=7.4'
	$(PY) -m piptools compile -q --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --extra server -o requirements.lock pyproject.toml
	$(PY) -m piptools compile -q --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --extra server --extra dev -o requirements-dev.lock pyproject.toml

upgrade: $(PY)  ## move every locked package to its newest version that pyproject.toml allows
	$(PY) -m pip install -q 'pip-tools>=7.4'
	$(PY) -m piptools compile -q --upgrade --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --extra server -o requirements.lock pyproject.toml
	$(PY) -m piptools compile -q --upgrade --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --extra server --extra dev -o requirements-dev.lock pyproject.toml
	@if command -v npm >/dev/null; then npm install --no-audit --no-fund --silent; fi

protos:  ## regenerate the checked-in Python stubs (and the HTTP API's OpenAPI document) from protos/
	$(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTO_FILES)
	$(PY) -m services.http.openapi

check-protos:  ## fail when the checked-in stubs are stale
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --mypy_out=$$tmp \
	  --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp $(PROTO_FILES) && \
	diff -r -x __init__.py -x __pycache__ -x py.typed $$tmp/conveyor/v1 conveyor/v1 \
	  && echo "stubs are up to date" || { echo "stubs are stale: run make protos"; exit 1; }

openapi:  ## regenerate the HTTP API's OpenAPI document (services/http/openapi.json) from protos/
	$(PY) -m services.http.openapi

check-openapi:  ## fail when the checked-in OpenAPI document is stale
	$(PY) -m services.http.openapi --check

dashboard:  ## type-check the dashboard (services/http/dashboard/) and rebuild its checked-in assets in services/http/static/
	./node_modules/.bin/tsc -p services/http/dashboard
	node services/http/dashboard/build.mjs

check-dashboard:  ## fail when the dashboard does not type-check or its checked-in assets are stale
	./node_modules/.bin/tsc -p services/http/dashboard
	@tmp=$$(mktemp -d); node services/http/dashboard/build.mjs $$tmp && \
	  diff -r $$tmp services/http/static && echo "dashboard assets are up to date" \
	  || { echo "dashboard assets are stale: run make dashboard"; exit 1; }

browser:  ## install Debian's chromium (the dashboard's browser tests drive it) if missing
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; \
	  fi; \
	  command -v chromium >/dev/null || echo "chromium not installed (apt-get install chromium): the dashboard's browser tests are skipped"; \
	}

lint-protos:  ## lint protos/ with buf
	./node_modules/.bin/buf lint

lint: lint-protos  ## ruff, mypy and buf
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy conveyor services tests bench

test: install browser  ## run the test suite against the local RabbitMQ and Postgres
	$(VENV)/bin/pytest -q

up: install  ## start simulator + five services (HTTP API included) in the background, run the demo
	$(PY) -m devtools.devstack up
	$(PY) -m devtools.devstack demo

down:  ## stop what `make up` started
	$(PY) -m devtools.devstack down

demo:  ## submit a demo job and stream its tokens
	$(PY) -m devtools.devstack demo

bench: install bench-tools  ## run the benchmark scenarios, print and save the figures
	$(PY) -m bench $(BENCH_ARGS)

compare: $(if $(REF),install bench-tools)  ## benchmark REF against this tree, A B A B (REF=origin/main SCENARIOS="cost")
	@test -n "$(REF)" || { echo 'usage: make compare REF=<git ref> [SCENARIOS="end-to-end cost"] [COMPARE_ARGS="--pairs 5"]'; exit 2; }
	$(PY) -m bench compare $(REF) $(SCENARIOS) $(COMPARE_ARGS)

.PHONY: chaos
chaos: install  ## inject faults (kills, broker and database outages) into a private stack; fail if a job is lost or run twice
	$(PY) -m bench.chaos $(CHAOS_ARGS)

bench-tools:  ## install h2load (Debian's nghttp2-client), the bench's C load generator, if missing
	@command -v h2load >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q nghttp2-client >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nghttp2-client >/dev/null 2>&1; }; \
	  fi; \
	  command -v h2load >/dev/null || echo "h2load not installed (apt-get install nghttp2-client): the bench uses Python clients only"; \
	}

clean:  ## remove the run folder and caches
	rm -rf run .mypy_cache .ruff_cache .pytest_cache
