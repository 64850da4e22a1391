# Two-command set-up: `make demo` runs the main job, `make test` runs the test suite.
# Both install the exact versions in constraints.txt (`make lock` refreshes them).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

# The package alone: what the demo, training, evaluation and scoring need (no torch).
$(VENV)/.installed-base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e .
	touch $@

# Plus the `torch` extra (torch, torchvision, timm, safetensors: weight conversion and
# the PyTorch parity tests) and the `dev` extra (pytest, ruff); and the packages of the
# `tpu-aot` and `gpu-aot` extras (the TPU and GPU compilers of hyperiqa_jax.aot) in a folder
# of their own, which only that command puts on its path: installed in the environment,
# they would make every JAX process look for a TPU and a GPU.
$(VENV)/.installed: $(VENV)/.installed-base
	$(PIP) -e ".[torch,dev]"
	$(PIP) --no-deps --target $(VENV)/aot-compilers libtpu jax-cuda12-plugin jax-cuda12-pjrt
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=20 tests

# The demo re-executes itself under mimalloc, which the package installs
# (hyperiqa_jax/allocator.py; HYPERIQA_ALLOCATOR=system opts out).
demo: $(VENV)/.installed-base
	$(PY) -m hyperiqa_jax.demo

# constraints.txt from a fresh environment: the newest versions pyproject's ranges allow.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e ".[torch,dev,tpu-aot,gpu-aot]"
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable; } \
		> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

.PHONY: install test demo lock
