# make serve: create .venv, install tcserve, start it on the embedded model (ARGS="--port 9000" to add flags)
# make test:  install the test dependencies (Python and node) and run the whole suite
# make fuzz:  10,000+ schemathesis cases, 12,000 valid edge requests (twice each, via the SDK), a short real-model run
# make bench: tcserve against llama-server and llama-cpp-python, one table (bench/README.md; ARGS="--quick")
# make soak:  64 clients x 100 requests on the embedded model; nothing lost, mixed up or leaked

PYTHON ?= python3.11
VENV   := .venv
VLLM_VENV := .venv-vllm
BIN    := $(VENV)/bin
ARGS   ?=

# llama-cpp-python compiles llama.cpp on install (a few minutes; pip's wheel cache
# serves later installs). Build only the library: no tools, examples, tests or server.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on CPUs that report
# AMX inside VMs like ours; -march=native would turn them on, so keep them off.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
PIP_INSTALL := CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/python -m pip install

.PHONY: serve test fuzz bench soak install install-test install-bench lint clean chromium

serve: install
	$(BIN)/tcserve serve $(ARGS)

test: install-test tests/node/node_modules $(VLLM_VENV)/.installed chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# More than 10,000 fuzzed requests (up to 4,000 per operation of the OpenAPI document).
fuzz: install-test
	FUZZ_EXAMPLES=4000 $(BIN)/python -m pytest -p no:cacheprovider -q -s --timeout 1800 tests/test_fuzz.py

bench: install-bench
	$(BIN)/python bench/run.py $(ARGS)

soak: install-bench
	$(BIN)/python bench/soak.py $(ARGS)

lint: install-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

install-bench: $(VENV)/.installed-bench

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP_INSTALL) -e '.[test,bench]'
	touch $@

# vLLM's CPU build, in a venv of its own, for tests/test_upstream_vllm.py: the exact
# frozen set, without dependency resolution (see tests/vllm-requirements.txt for why).
$(VLLM_VENV)/.installed: tests/vllm-requirements.txt
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r tests/vllm-requirements.txt
	touch $@

# The playground's browser tests drive Debian's Chromium through Playwright (never a
# downloaded browser). Installed with apt-get when missing; needs root (CI runs as root).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

chromium: /usr/bin/chromium

/usr/bin/chromium:
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

tests/node/node_modules: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
