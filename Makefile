# fabrik: the two set-up commands of the README are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=

.PHONY: install test test-fast run clean

# The stamp is rebuilt when the project's dependencies change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU wheel: an unpinned torch would pull several GB of CUDA.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[server,test]"
	# Native CPU kernels, compiled for this machine; without a compiler the engine falls back to torch's kernels.
	$(PY) -m fabrik.kernels.build || echo "native kernels not built: the torch kernels will be used"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

run: install
	$(VENV)/bin/fabrik serve $(MODEL) --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info

include bench/Makefile.inc
