# llm-sidecar — build, test, demo, benchmark.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= llm-sidecar:$(VERSION)

.PHONY: build test lint fmt-check clippy cargo-test py-test demo run bench bench-throughput bench-rollback image clean

build:
	$(CARGO) build --release

## test: everything CI runs — formatting, clippy, Rust tests, the OpenAI Python SDK test.
test: lint cargo-test py-test

lint: fmt-check clippy

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

cargo-test:
	$(CARGO) test

$(VENV)/.installed: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r tests/python/requirements.txt
	touch $@

py-test: $(VENV)/.installed
	$(CARGO) build --bin llm-sidecar
	LLM_SIDECAR_BIN=$(CURDIR)/target/debug/llm-sidecar $(VENV)/bin/python -m pytest -q tests/python

## demo: offline walk-through — fake provider, sidecar on the embedded default, a routing flip.
demo: build
	bash scripts/demo.sh

## run: the sidecar on 127.0.0.1:4000 (admin :4001) on the embedded default, pointed at the fake provider.
run: build
	bash scripts/run-local.sh

## bench: throughput against nginx (wrk), then rollback propagation across 20 sidecars.
bench: bench-throughput bench-rollback

bench-throughput:
	bash bench/run.sh

bench-rollback:
	$(PYTHON) bench/rollback.py

image:
	docker build -t $(IMAGE) .

clean:
	$(CARGO) clean
	rm -rf $(VENV)
