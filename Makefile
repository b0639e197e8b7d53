# Spool: `make dev` runs the embedded stack, `make test` runs every test tier. Both set up what is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Lambda runs python3.12; use a 3.12 interpreter for the virtual environment (pyenv's, if that is where it is).
PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
ENCODINGS := .cache/tiktoken
export TIKTOKEN_CACHE_DIR := $(CURDIR)/$(ENCODINGS)
export SAM_CLI_TELEMETRY := 0

.PHONY: help dev demo test unit integration e2e lint bench fuzz openapi validate build clean encodings venv browser

help:
	@echo "make dev       run the embedded stack (moto + API Gateway emulator + worker) on 127.0.0.1:$${SPOOL_PORT:-8000}"
	@echo "make demo      the one-command tour: stack, context, streamed answer, dropped and resumed"
	@echo "make test      lint, type-check and run the unit, integration and end-to-end tests with coverage"
	@echo "make bench     print the benchmarks"
	@echo "make fuzz      thousands of bad requests and WebSocket frames against an embedded stack"
	@echo "make openapi   rebuild shared/spool_core/openapi.json (served at /v1/openapi.json)"
	@echo "make checkov   checkov on the SAM-expanded template (skips justified in docs/decisions.md)"
	@echo "make validate  sam validate --lint"
	@echo "make build     sam build (bundles the tiktoken encodings and every module's bytecode into the layer)"

$(BIN)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 is required (python3.12 on PATH or under pyenv)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

$(ENCODINGS)/.ready: scripts/fetch_encodings.py | $(BIN)/.installed
	$(BIN)/python scripts/fetch_encodings.py $(ENCODINGS)
	touch $@

encodings: $(ENCODINGS)/.ready

# The local state (tables, objects, queued messages) is kept in .spool/state across a clean stop and
# start; SPOOL_STATE_DIR= (empty) runs a throwaway stack.
dev: venv encodings
	SPOOL_STATE_DIR="$${SPOOL_STATE_DIR-$(CURDIR)/.spool/state}" $(BIN)/spool dev

demo: venv encodings
	$(BIN)/spool demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv encodings
	$(BIN)/pytest tests/unit -q

integration: venv encodings
	$(BIN)/pytest tests/integration -q

e2e: venv encodings browser
	$(BIN)/pytest tests/e2e -q

# The playground's browser tests drive Debian's Chromium (Playwright's browser download is not
# used). Installed when missing and possible (root with apt-get); otherwise those tests skip.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get) for the playground's browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || true; \
	fi; \
	if [ ! -x $(CHROMIUM) ]; then \
		echo "notice: no Chromium at $(CHROMIUM) and it could not be installed here;"; \
		echo "notice: the playground's browser tests (tests/e2e/test_playground.py) will be skipped."; \
		echo "notice: install it with 'apt-get install chromium' (as root) to run them."; \
	fi

# The tiers run in order, fastest first; coverage accumulates and the gate applies to the total.
test: venv encodings browser lint
	$(BIN)/coverage erase
	$(BIN)/pytest tests/unit --cov --cov-append --cov-report= --cov-fail-under=0
	$(BIN)/pytest tests/integration --cov --cov-append --cov-report= --cov-fail-under=0
	$(BIN)/pytest tests/e2e --cov --cov-append --cov-report=term

validate: venv
	$(BIN)/sam validate --lint

build: venv encodings
	PATH="$(dir $(PYTHON)):$$PATH" $(BIN)/sam build
	$(BIN)/python scripts/layer_bytecode.py .aws-sam/build/SharedLayer/python

bench: venv encodings
	$(BIN)/python -m bench

# Thousands of bad requests and WebSocket frames against an embedded stack (bench/fuzz.py).
fuzz: venv encodings
	$(BIN)/python -m bench.fuzz

# The OpenAPI document served at /v1/openapi.json, rebuilt from the functions' routes and models.
openapi: venv
	$(BIN)/python -m spool.openapi

clean:
	rm -rf $(VENV) .cache .spool .aws-sam .pytest_cache .mypy_cache .ruff_cache .coverage

# checkov on the template as CloudFormation receives it (SAM's transform applied locally: no AWS
# account), from its own virtualenv (its dependencies do not mix with the project's). The checks
# skipped here (and in a resource's Metadata) fail by design; docs/decisions.md gives each reason.
CHECKOV_VENV ?= .cache/checkov
CHECKOV_SKIP := CKV_AWS_18,CKV_AWS_21,CKV_AWS_27,CKV_AWS_115,CKV_AWS_116,CKV_AWS_117,CKV_AWS_119,CKV_AWS_120,CKV_AWS_149,CKV_AWS_158,CKV_AWS_173
define CHECKOV_EXPAND
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

class NoManagedPolicyLookup:
    def load(self):
        return {}

template = yaml_parse(open("template.yaml").read())
for resource in template["Resources"].values():
    props = resource.get("Properties", {})
    for key in ("CodeUri", "ContentUri"):  # local code becomes a placeholder, as in sam validate
        if isinstance(props.get(key), str):
            props[key] = "s3://placeholder/code.zip"
json.dump(transform(template, {}, NoManagedPolicyLookup()), sys.stdout, indent=1)
endef
export CHECKOV_EXPAND

.PHONY: checkov
checkov: venv
	test -x $(CHECKOV_VENV)/bin/checkov || { python3 -m venv $(CHECKOV_VENV) && $(CHECKOV_VENV)/bin/pip install --quiet checkov; }
	mkdir -p .cache
	AWS_DEFAULT_REGION=us-east-1 $(BIN)/python -c "$$CHECKOV_EXPAND" > .cache/template.cfn.json
	$(CHECKOV_VENV)/bin/checkov -f .cache/template.cfn.json --framework cloudformation --compact --quiet \
		--skip-download --skip-check $(CHECKOV_SKIP)
