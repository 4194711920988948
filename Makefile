# Two commands on a fresh clone (see README):  make demo   and   make test
PYTHON      ?= python3
VENV        ?= .venv
# Constraints used by setup only (fast CPU torch on the project's machines); `make demo CONSTRAINTS=`
# drops them and lets pip choose any torch >= 2.2.
CONSTRAINTS ?= constraints.txt
EXTRAS      ?= test
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.dsbp-installed-$(EXTRAS)
PIP_C       := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install -q $(PIP_C) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m dsbp.cli demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m mypy src/dsbp

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
