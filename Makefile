# Conveyor — developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
PROTO_FILES := $(wildcard protos/conveyor/v1/*.proto)
BENCH_ARGS ?=
# e.g. make bench BENCH_ARGS="--repeat 3" (medians of three runs) or "submit --quick"

.PHONY: help install protos check-protos lint-protos lint typecheck test up down demo bench bench-tools clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)  ## create the venv and install Conveyor with its dev tools
	$(PY) -m pip install -q -e '.[dev]'
	@if command -v npm >/dev/null; then npm install --no-audit --no-fund --silent; fi

protos:  ## regenerate the checked-in Python stubs from protos/
	$(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTO_FILES)

check-protos:  ## fail when the checked-in stubs are stale
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --mypy_out=$$tmp \
	  --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp $(PROTO_FILES) && \
	diff -r -x __init__.py -x __pycache__ -x py.typed $$tmp/conveyor/v1 conveyor/v1 \
	  && echo "stubs are up to date" || { echo "stubs are stale: run make protos"; exit 1; }

lint-protos:  ## lint protos/ with buf
	./node_modules/.bin/buf lint

lint: lint-protos  ## ruff, mypy and buf
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy conveyor services tests bench

test: install  ## run the test suite against the local RabbitMQ and Postgres
	$(VENV)/bin/pytest -q

up: install  ## start simulator + four services in the background, run the demo
	$(PY) -m conveyor.devstack up
	$(PY) -m conveyor.devstack demo

down:  ## stop what `make up` started
	$(PY) -m conveyor.devstack down

demo:  ## submit a demo job and stream its tokens
	$(PY) -m conveyor.devstack demo

bench: install bench-tools  ## run the benchmark scenarios, print and save the figures
	$(PY) -m bench $(BENCH_ARGS)

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
