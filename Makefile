# wan_dist: `make run` and `make test` set everything up on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
NPROC  ?= 2
ARGS   ?=
STAMP  := $(VENV)/.installed
# One thread per rank unless asked otherwise: ranks share the cores (and torchrun warns when unset).
export OMP_NUM_THREADS ?= 1

.PHONY: install run test test-gpu bench sweep clean

install: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml: where a local CPU build of it is on pip's find-links (these
# CPU machines) pip takes it (2.13.0+cpu sorts above 2.13.0); on a GPU machine the same pin is the CUDA
# build from PyPI.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

run: $(STAMP)
	$(TORCHRUN) --nproc_per_node=$(NPROC) launch/generate.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu $(ARGS)

bench: $(STAMP)
	$(PY) launch/bench.py $(ARGS)

# One rank, then every 2-rank layout, as one Hydra multirun: each job its own torchrun world (the torchrun
# launcher, conf/experiment/layouts.yaml); summary.{csv,md,png} in the sweep dir at the end.
sweep: $(STAMP)
	$(PY) launch/generate.py -m +experiment=layouts $(ARGS)

clean:
	rm -rf outputs multirun bench_results .pytest_cache
