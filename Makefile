# The two commands a newcomer needs:  `make serve`  and  `make test`.
#   make serve   installs what serving needs (the package and its runtime dependencies) and starts the server
#   make test    installs the test tools too (the `dev` extra; as root also the Debian packages of
#                scripts/setup-system.sh: the data set, Chromium, podman, Prometheus, kubectl), then runs
#                ruff, mypy and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed

.PHONY: setup system serve test lint format typecheck pytest bench proto clean

# Serving: the package and its runtime dependencies only.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(SERVE_STAMP)

# Development and tests: the `dev` extra (pytest, ruff, mypy, Playwright, Ray Serve, ...) on top.
$(STAMP): $(SERVE_STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) system

system:
	@bash scripts/setup-system.sh

serve: $(SERVE_STAMP)
	$(VENV)/bin/mone-serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

proto: $(STAMP)  # regenerate server/http/proto's stubs after editing inference.proto (they are committed)
	$(PY) scripts/gen_proto.py

bench: setup
	$(PY) -m bench.model_speed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
