# Two-command set-up: `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q "torch>=2.4,<=2.14.1" torchvision
	$(PY) -m pip install -q -e ".[torch,dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# tcmalloc, where installed (apt install libtcmalloc-minimal4), spares JAX's CPU
# steps glibc's page faults: about 25% faster training (docs/benchmarks.md).
TCMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)

demo: $(VENV)/.installed
	$(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)) $(PY) -m hyperiqa_jax.demo

.PHONY: install test demo
