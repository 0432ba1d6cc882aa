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

.PHONY: install run test test-full test-slow test-gpu bench sweep clean gpu-wheels gpu-check

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

# What CI runs: every layout, family, memory option, VAE mode and sampler at least once (tests/matrix.py
# fails when one is covered by no case), each end-to-end claim once.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not full" --durations=25 $(ARGS)

# The whole cross product: every case of tests/matrix.py and every variant of the end-to-end tests.
test-full: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=25 $(ARGS)

# The real-size CPU tests (the 1.3B architecture sharded over two ranks: about 6 minutes).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu $(ARGS)

bench: $(STAMP)
	$(PY) launch/bench.py $(ARGS)

# One rank, then every 2-rank layout, as one Hydra multirun: each job its own torchrun world (the torchrun
# launcher, conf/experiment/layouts.yaml); summary.{csv,md,png} in the sweep dir at the end. ARGS first:
# Hydra takes its options (--config-dir=...) only before the overrides.
sweep: $(STAMP)
	$(PY) launch/generate.py -m $(ARGS) +experiment=layouts

# What a GPU machine with torch but none of our other dependencies needs (Python 3.12, manylinux x86_64),
# one version each, into .whl/ (ignored by git; emptied first, so that no stale second version stops the
# install; under 64 MiB in all, what one device call carries). The GPU machine's image already holds
# torch, transformers, accelerate, peft, einops, sentencepiece, safetensors, pyyaml, pillow, numpy,
# huggingface-hub, regex, requests, filelock, zipp, packaging, psutil, pytest and pytest-timeout.
# xfuser's other requirements, av and beautifulsoup4, are left out: nothing xfuser runs for us imports
# them. distvae is carried: xfuser's VAE manager imports it. imageio-ffmpeg 0.5.1: its bundled ffmpeg
# makes a 27 MB wheel, 0.8.1's a 68 MB one. antlr4-python3-runtime 4.9.3 is published as a source archive
# only: built here into a pure-Python wheel.
GPU_WHEELS := diffusers==0.42.1 xfuser==0.7.0 yunchang==0.6.4 distvae==0.1.0 hydra-core==1.3.8 omegaconf==2.3.1 \
	imageio==2.38.1 imageio-ffmpeg==0.5.1 ftfy==6.3.1 wcwidth==0.2.13 importlib-metadata==8.7.0
gpu-wheels: $(STAMP)
	rm -rf .whl
	mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
	du -sh .whl

# On the GPU machine (its own python3 with CUDA torch), the wheels carried along in .whl/, in two planned
# calls (CALL=1: does the CUDA path work at all; CALL=2: two ranks on the one GPU, tests/gpu, compile,
# memory); the summary goes to $(OUT) (or gpu_check_out/). The machine may have no make: the same command
# is `python3 launch/gpu_check.py --call 1 --wheels .whl --out $$OUT`.
GPU_PYTHON ?= python3
CALL ?= 1
gpu-check:
	$(GPU_PYTHON) launch/gpu_check.py --call $(CALL) --wheels .whl $(if $(OUT),--out $(OUT))

clean:
	rm -rf outputs multirun bench_results .pytest_cache gpu_check_out
