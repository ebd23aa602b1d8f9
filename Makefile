# The two commands a newcomer needs:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system serve test lint format typecheck pytest bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) system

system:
	@bash scripts/setup-system.sh

serve: setup
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

proto: $(STAMP)  # regenerate server/proto's stubs after editing inference.proto (they are committed)
	$(PY) scripts/gen_proto.py

bench: setup
	$(PY) -m bench.model_speed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
