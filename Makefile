# Two-command set-up: `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# The package alone: what the demo, training, evaluation and scoring need (no torch).
$(VENV)/.installed-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# Plus the `torch` extra (torch, torchvision, timm, safetensors: weight conversion and
# the PyTorch parity tests) and the `dev` extra (pytest, ruff).
$(VENV)/.installed: $(VENV)/.installed-base
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q "torch>=2.4,<=2.14.1" torchvision
	$(PY) -m pip install -q -e ".[torch,dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The demo re-executes itself under mimalloc, which the package installs
# (hyperiqa_jax/allocator.py; HYPERIQA_ALLOCATOR=system opts out).
demo: $(VENV)/.installed-base
	$(PY) -m hyperiqa_jax.demo

.PHONY: install test demo
