# vitscope: `make demo` runs the offline showcase, `make test` runs the test suite.
# Both create .venv with the pinned versions in constraints.txt on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck browser clean bench wheel-check

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip -c $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/vitscope demo

# Headless Chromium for the viewer's browser tests (Debian packages; needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not installed: browser tests will be skipped"; fi; }

test: $(VENV)/.installed browser lint
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The built wheel in fresh venvs (core, then each extra alone), every subcommand and method run from outside
# the repository: an undeclared run-time import fails here (.ci/wheel_check.py; uv makes the venvs).
wheel-check: $(VENV)/.installed
	$(PIP) install -q -c $(CONSTRAINTS) uv
	$(PY) .ci/wheel_check.py $(WHEEL_CHECK_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) benchmarks/capture_memory.py
	$(PY) benchmarks/speed.py --quick
	$(PY) benchmarks/batch_throughput.py
	$(PY) benchmarks/batch_ray.py
	$(PY) benchmarks/viewer_page.py
	$(PY) benchmarks/train_mnist.py

clean:
	rm -rf $(VENV) vitscope-demo .pytest_cache
