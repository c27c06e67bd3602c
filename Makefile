# The README's two commands: `make run` and `make test`.  Both set up .venv first if
# needed (scripts/setup.sh is idempotent and returns at once when nothing changed).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
NP ?= 4

.PHONY: setup run demo compare test bench clean

setup:
	@bash scripts/setup.sh

# The main job: MVSM on the bundled digits, NP ranks; prints the final test accuracy and
# the bytes moved next to an fp32 allreduce's.
run: setup
	$(VENV)/bin/mpirun -np $(NP) $(PY) mpi_examples/train.py --method mvsm-v1 --epochs 10

# The first issue's demo: pack signs, vote, print the result and the bytes.
demo: setup
	$(VENV)/bin/mpirun -np $(NP) $(PY) -m signcomm.demo

# The paper's two experiments in miniature: figures and a table under results/compare/.
compare: setup
	$(PY) scripts/compare.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/kernel_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
