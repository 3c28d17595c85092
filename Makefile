# mailrelay: the two commands a newcomer needs are `make up` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-deps

.PHONY: up test doctor lint typecheck imports pytest install system-deps helm crds clean fuzz-long bench reliability image image-test

## up: create the virtualenv on first use and run the quickstart topology on this machine
up: install
	$(BIN)/mailrelay up -f examples/quickstart

## install: the virtualenv with the project and its development tools
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## system-deps: Debian packages (postfix, swaks, graphviz) and the helm binary the tests use
system-deps: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): scripts/install-system-deps.sh scripts/install-helm.sh tests/doctor.py | $(STAMP)
	bash scripts/install-system-deps.sh $(BIN)/python
	bash scripts/install-helm.sh $(BIN)
	touch $@

## doctor: check every outside capability the tests and benchmarks use (ok / missing, and the package)
doctor: install system-deps
	$(BIN)/python -m tests.doctor

## test: everything CI runs: the doctor, ruff, mypy --strict, import-linter and the whole pytest suite
test: install system-deps doctor lint typecheck imports pytest

lint:
	$(BIN)/ruff check relay operator tests $(wildcard bench scripts)
	$(BIN)/ruff format --check relay operator tests $(wildcard bench scripts)

typecheck:
	$(BIN)/mypy

imports:
	$(BIN)/lint-imports

pytest:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not fuzz_long and not image"

## image: build localhost/mailrelay:<version> from the Dockerfile with buildah, as root (no Docker
## daemon). PYTHON_IMAGE=python:3.11-slim (the default) needs a registry; PYTHON_IMAGE=local
## makes a Debian 12 base with mmdebstrap first (machines that reach no container registry).
PYTHON_IMAGE ?= python:3.11-slim
image:
	PYTHON_IMAGE=$(PYTHON_IMAGE) bash scripts/image.sh

## image-test: run the image for real (tests/image: --version, uid 10001, no compiler, the operator's
## --help, a relay with a read-only root delivering to a sink); builds on the local Debian base
## unless IMAGE_TEST_BASE=python:3.11-slim; not part of `make test` (README, "The image")
IMAGE_TEST_BASE ?= local
image-test: install
	PYTHON_IMAGE=$(IMAGE_TEST_BASE) bash scripts/image.sh
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rA -s -m image tests/image

## crds: regenerate the Helm chart's CRD templates from crds/
crds: install
	$(BIN)/python scripts/sync_chart_crds.py

## fuzz-long: the long property-based fuzzing run (>= 100,000 examples per target)
fuzz-long: install
	HYPOTHESIS_PROFILE=long MAILRELAY_FIGURES=$(CURDIR)/.reliability-fuzz-long.json $(BIN)/python -m pytest -q -m fuzz_long -p no:timeout

## reliability: run the fault, hostile-input and peer suites and write their figures into docs/RELIABILITY.md
reliability: install system-deps doctor
	rm -f $(CURDIR)/.reliability.json
	PATH="$(CURDIR)/$(BIN):$$PATH" MAILRELAY_FIGURES=$(CURDIR)/.reliability.json $(BIN)/python -m pytest -q -m "not fuzz_long" tests/faults tests/hostile tests/peers
	$(BIN)/python -m tests.faults.report $(CURDIR)/.reliability.json $(wildcard $(CURDIR)/.reliability-fuzz-long*.json) --write docs/RELIABILITY.md

## bench: the Postfix side-by-side benchmark (see bench/README.md)
bench: install system-deps doctor
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mailrelay .pytest_cache .mypy_cache .ruff_cache
