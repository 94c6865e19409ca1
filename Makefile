# nanoserve: every target makes its own virtual environment (.venv) when it is missing.
#   make run PROMPT="def fibonacci(n):"     stream a completion (MODEL=gpt2 MAX_TOKENS=64)
#   make test                               the test suite (CPU, offline)
#   make weights MODEL=gpt2                 download a checkpoint from the hub into weights/
#   make bench                              CPU benchmark against Hugging Face
#   make serve                              OpenAI-compatible HTTP server on 127.0.0.1:8000
#   make lessons                            run every lesson in examples/ (figures to docs/lessons/)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch goes in first, pinned, so that later requirements (">=2.4") are already satisfied and
# pip never swaps it for a multi-GB download. On a GPU machine the same pin from PyPI is a
# CUDA build; override with e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130".
TORCH_SPEC ?= torch==2.13.0
# A CUDA build of torch brings its own matching triton; the CPU build has none, and the
# kernel tests need it to run Triton's interpreter (TRITON_INTERPRET=1). They pass with triton
# 3.7.1, 3.8.0 and 3.9.0; triton 3.6's interpreter also needs numpy < 2.4 (it calls int() on
# one-element arrays, which numpy 2.4 refuses).
TRITON_SPEC ?= triton==3.7.1

MODEL      ?= gpt2
PROMPT     ?= def fibonacci(n):
MAX_TOKENS ?= 64
TEMPERATURE ?= 0.0
PORT       ?= 8000
EXTRAS     ?= dev

.PHONY: run test weights bench serve lessons clean venv gpu-check

$(VENV)/.installed-%: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q $(TRITON_SPEC)
	$(PY) -m pip install -q -e ".[$*]"
	@touch $@

venv: $(VENV)/.installed-dev

run: $(VENV)/.installed-dev
	$(PY) -m nanoserve generate --model "$(MODEL)" --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS) --temperature $(TEMPERATURE)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

weights: $(VENV)/.installed-dev
	$(PY) -m nanoserve download $(MODEL)

bench: $(VENV)/.installed-dev
	$(PY) -m nanoserve bench cpu

serve: $(VENV)/.installed-serve
	$(PY) -m nanoserve serve --model "$(MODEL)" --port $(PORT)

# Each lesson is a plain script; they run in order and stop at the first that fails its checks.
lessons: $(VENV)/.installed-dev
	@for f in examples/[0-9][0-9]_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache

# On the GPU machine (python3 there already has torch, triton, transformers):
#   make gpu-check PY=python3 OUT=/some/dir
OUT ?= bench_out
gpu-check:
	$(PY) -m pytest -q tests/test_kernels.py tests/test_gemv.py tests/test_gpu.py tests/test_fused.py tests/test_async.py 2>&1 | tee $(OUT)/gpu_tests.log
	$(PY) -m nanoserve bench latency --device cuda --model gpt2 --out $(OUT) 2>&1 | tee $(OUT)/latency_gpt2.log
	$(PY) -m nanoserve bench throughput --device cuda --model gpt2 --out $(OUT) 2>&1 | tee $(OUT)/throughput.log
	$(PY) -m nanoserve bench latency --device cuda --model gpt2-xl --out $(OUT) 2>&1 | tee $(OUT)/latency_xl.log
	$(PY) -m nanoserve bench sweep --device cuda --model gpt2 --out $(OUT) 2>&1 | tee $(OUT)/sweep.log
	mkdir -p $(OUT)/eager          # the same decode step without fused.py, for comparison
	$(PY) -m nanoserve bench latency --device cuda --model gpt2-xl --no-fused-decode --no-compare-hf --out $(OUT)/eager 2>&1 | tee $(OUT)/eager/latency_xl.log
