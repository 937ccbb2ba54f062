# Quickstart:  make chat [PROMPT="..."]   |   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= Write a Python function that returns the n-th Fibonacci number.
ARGS   ?=

.PHONY: chat test venv dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; nothing later may pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(BIN)/pip install -q -e ".[server,train,eval,dev]"
	touch $@

venv: $(VENV)/.core
dev: $(VENV)/.dev

chat: $(VENV)/.core
	$(BIN)/qwenkit pull
	$(BIN)/qwenkit chat --message "$(PROMPT)" $(ARGS)

test: $(VENV)/.dev
	$(BIN)/qwenkit pull
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
