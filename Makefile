# Two commands on a fresh machine: `make run` (set up if needed, then the main job) and `make test` (set up if
# needed, then the tests). The virtual environment is built once, when it is missing, from constraints.txt
# (CPU torch wheel); after changing dependencies, `rm -rf .venv` or run the pip line yourself.
VENV := .venv
PY := $(VENV)/bin/python
# The shared real datasets sit beside the project root; tests and runs find them through XAILAB_DATA_DIR.
DATA := $(wildcard ../shared/datasets)
export XAILAB_DATA_DIR ?= $(if $(DATA),$(abspath $(DATA)))

.PHONY: setup test run lint typecheck

setup: $(PY)

$(PY):
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -c constraints.txt -e ".[dev]"

test: setup
	$(VENV)/bin/pytest -q $(ARGS)

run: setup
	$(VENV)/bin/xailab run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy
