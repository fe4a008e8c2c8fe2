# The README's two commands. Both work on a machine with only Python 3.11, pip and make.
#
#   make demo    create .venv, install torch (pinned; override with TORCH=...), deepspeed
#                (--no-build-isolation, after torch), the package; then run the main job
#   make test    the same install plus the dev extras, then the test suite
#
# GPU users choose their torch build, e.g.:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned, so nothing later can resolve another (CUDA) build on a CPU machine;
# deepspeed's sdist imports torch in its setup, hence --no-build-isolation.
$(VENV)/.torch-installed: | $(BIN)/python
	$(PIP) install $(TORCH)
	$(PIP) install --no-build-isolation $(DEEPSPEED)
	touch $@

$(VENV)/.pkg-installed: setup.py $(VENV)/.torch-installed
	$(PIP) install -e .
	touch $@

$(VENV)/.dev-installed: setup.py $(VENV)/.pkg-installed
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.pkg-installed

install-dev: $(VENV)/.dev-installed

demo: install
	DS_ACCELERATOR=cpu OMP_WAIT_POLICY=PASSIVE $(BIN)/sparse-dit quickstart --out $(DEMO_OUT)

test: install-dev
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
