# llm-sidecar — build, test, demo, benchmark.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= ghcr.io/llm-sidecar/llm-sidecar:$(VERSION)
IMAGE_FAKE ?= ghcr.io/llm-sidecar/llm-sidecar-fake-provider:$(VERSION)

.PHONY: build test lint fmt-check clippy fake-free cargo-test py-test rules-test demo run bench bench-throughput bench-rollback bench-budget bench-cache bench-memory bench-cold soak image image-fake clean e2e-kind chart-test

## build: both release binaries, the sidecar and the fake provider the demo, run, bench and soak use.
build:
	$(CARGO) build --release --bin llm-sidecar --bin llm-sidecar-fake-provider

## test: everything CI runs — formatting, clippy, the fake-free check, Rust tests of the whole workspace (the budget
## tests start redis-server), the OpenAI Python SDK test, the Helm chart, the alert rules under promtool.
test: lint cargo-test py-test chart-test rules-test

## lint: formatting, clippy, and the product's dependencies checked free of the fake provider.
lint: fmt-check clippy fake-free

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fake-free: the product (package llm-sidecar, its lib and binary) does not depend on the fake
## provider's crate, which may only be a dev-dependency (cargo tree --edges normal,build).
fake-free:
	CARGO=$(CARGO) bash scripts/fake-free.sh

cargo-test:
	$(CARGO) test --workspace

$(VENV)/.installed: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r tests/python/requirements.txt
	touch $@

py-test: $(VENV)/.installed
	$(CARGO) build --bin llm-sidecar --bin llm-sidecar-fake-provider
	LLM_SIDECAR_BIN=$(CURDIR)/target/debug/llm-sidecar LLM_SIDECAR_FAKE_BIN=$(CURDIR)/target/debug/llm-sidecar-fake-provider \
		$(VENV)/bin/python -m pytest -q tests/python

## chart-test: helm lint --strict + helm template of charts/llm-sidecar with every tests/chart/ values file, validated
## for Kubernetes 1.33 (kubernetes-validate --strict), the injector's golden template, bad values rejected. Installs Helm v3 into .tools/.
chart-test: $(VENV)/.installed
	$(CARGO) build --bin llm-sidecar
	PYTHON=$(VENV)/bin/python bash scripts/chart-test.sh

## rules-test: promtool check rules on deploy/prometheus-rule.yaml and promtool test rules with tests/prometheus/
## (Debian package prometheus; a missing promtool fails).
rules-test:
	bash scripts/rules-test.sh

## demo: offline walk-through — fake provider, sidecar on the embedded default, a routing flip.
demo: build
	bash scripts/demo.sh

## run: the sidecar on 127.0.0.1:4000 (admin :4001) on the embedded default, pointed at the fake provider.
run: build
	bash scripts/run-local.sh

## bench: throughput against nginx (wrk) and CPU per request, saturated and at a fixed load, rollback propagation across 20 sidecars, the cost of budget checks, a cache hit against a miss,
## the sidecar's memory (idle, saturated, 1 000 open streams, after them), cold start and a cold burst of streams.
bench: bench-throughput bench-rollback bench-budget bench-cache bench-memory bench-cold

bench-throughput:
	bash bench/run.sh

bench-rollback:
	$(PYTHON) bench/rollback.py

## bench-budget: reserve + settle per request, in memory and with redis-server on loopback (µs and req/s).
bench-budget:
	$(CARGO) test --release --test spend bench_budget_checks -- --ignored --nocapture

## bench-cache: req/s and latency of a cache hit against a miss (the same request with x-llm-sidecar-cache: refresh).
bench-cache:
	bash bench/cache.sh

## bench-memory: the sidecar's RSS idle, under wrk saturation, with 1 000 concurrent slow streams open and 10 s after them.
bench-memory:
	bash bench/memory.sh

## bench-cold: per fresh sidecar, start to /ready, then TTFT p50/p99 of 200 new streams cold, warm and direct, with the
## kernel's listen-queue overflows and SYN retransmissions around them.
bench-cold:
	bash bench/cold.sh

## soak: SOAK_SECONDS (600) of open-loop plain and streamed chat traffic at SOAK_RPS (1000) through the release
## sidecar, a routing-config change every second, a provider fault every 10 s; fails on a lost or skipped request,
## client and sidecar counts that disagree, an error no injected fault explains, or RSS growth of 5 MB. Not in `test`.
soak:
	bash bench/soak.sh

## image: the sidecar's image (the Dockerfile's default target): llm-sidecar only, no fake provider.
image:
	docker build -t $(IMAGE) .

## image-fake: the fake provider's image (Dockerfile target fake-provider), for e2e-kind only.
image-fake:
	docker build --target fake-provider -t $(IMAGE_FAKE) .

## e2e-kind: the image, the Helm chart and the injector on a local kind cluster (docker, kind, kubectl, helm).
e2e-kind:
	IMAGE=$(IMAGE) FAKE_IMAGE=$(IMAGE_FAKE) bash scripts/e2e-kind.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV)
