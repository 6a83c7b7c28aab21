# Two entry points, each sets up its own environment first (virtual env, the locked stack, model cache):
#   make run    the main job on the default model and data
#   make test   the test suite (what CI runs)
#   make lock   re-resolve requirements.lock from pyproject.toml, keeping pins (LOCK_ARGS=--upgrade
#               to take newer releases); then commit it
# DATA_DIR defaults to the shared offline copy beside the checkout; point it at your own data.
VENV      ?= .venv
PYTHON    ?= python3
DATA_DIR  ?= $(abspath ../shared/data)
# torch is resolved with the lock but installed on its own, first: the same release is a CPU build on
# this machine's disk and a CUDA build on PyPI, and one hash set cannot cover both. GPU machines:
#   make setup TORCH_PIN="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_PIN ?= $(shell grep -E '^torch==' lock/torch-constraint.txt)
PIP_PIN   ?= pip==26.1
UV_PIN    ?= uv==0.13.9
PY        := $(VENV)/bin/python
# --compile-bytecode: uv, unlike pip, installs without .pyc files, and where PYTHONDONTWRITEBYTECODE is
# set (this machine and CI) none are ever written, so every process compiled transformers and Ray from
# source at import: a fresh actor's start-up took 21.0 CPU-s against 10.3 compiled (0.49, measured in one
# run by benchmarks/process_startup.py). Compiled once here instead.
UV        := $(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode
export EAC_DATA_DIR := $(DATA_DIR)

.PHONY: setup run test model lock
setup: $(VENV)/.installed

# The lock is installed exactly: every package pinned and hash-checked, no resolution (--no-deps),
# the project itself without build isolation (its build backend, setuptools, is in the lock too).
# DeepSpeed (lock/deepspeed.lock, on top of the main lock) too: the sharded evaluator's `engine: deepspeed`
# runs and is tested on CPU (DeepSpeed's CPU accelerator, gloo). It ships as a source archive whose
# setup.py imports torch, hence no build isolation; DS_BUILD_OPS=0 compiles no op ahead of time (AutoTP
# without kernel injection needs none, and workers/placement.py keeps the one DeepSpeed would compile
# at first use, its shared-memory all-reduce, switched off on CPU).
$(VENV)/.installed: requirements.lock lock/deepspeed.lock lock/torch-constraint.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_PIN) $(UV_PIN)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(UV) --require-hashes --no-deps -r requirements.lock
	DS_BUILD_OPS=0 $(UV) --require-hashes --no-deps --no-build-isolation -r lock/deepspeed.lock
	$(UV) --no-deps --no-build-isolation -e .
	touch $@

model: setup
	$(VENV)/bin/eac model pull smollm2-135m

run: model
	$(VENV)/bin/eac run experiments/configs/demo.yaml --store results

test: model
	$(PY) -m pytest -q -p no:cacheprovider tests

# pip-compile, not uv, resolves the lock: it runs pip's resolver with this machine's pip settings, so
# torch resolves to the CPU build on disk instead of pulling the CUDA stack into the lock.
LOCK_TOOLS := .venv-lock
lock:
	test -d $(LOCK_TOOLS) || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install -q pip-tools==7.5.3
	$(LOCK_TOOLS)/bin/pip-compile -q --generate-hashes --strip-extras --extra dev \
	    --build-deps-for editable --unsafe-package torch --no-emit-index-url --no-emit-find-links \
	    -c lock/torch-constraint.txt -o requirements.lock $(LOCK_ARGS) pyproject.toml
	$(LOCK_TOOLS)/bin/pip-compile -q --generate-hashes --strip-extras --unsafe-package torch \
	    --no-emit-index-url --no-emit-find-links -c requirements.lock -c lock/torch-constraint.txt \
	    -o lock/deepspeed.lock $(LOCK_ARGS) lock/deepspeed.in
