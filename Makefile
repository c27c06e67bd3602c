# The README's two commands: `make run` and `make test`.  Both set up .venv first if
# needed (scripts/setup.sh is idempotent and returns at once when nothing changed).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
NP ?= 4

.PHONY: setup run test test-fast bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/mpirun -np $(NP) $(PY) -m signcomm.demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/kernel_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
