#!/usr/bin/env bash
# One H200 lease, fourth session: GPU tests, then the issue-11 workloads. Run from the repo root
# on the GPU machine (device tool): bash docs/bench/2026-11-30-h200-s4/lease.sh tests|bench|all
# Logs and JSON go under $OUT (the device tool brings them back).
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $OUT/gpu.txt
tests() {
  python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py tests/test_fused.py -k "not cpu" \
    > $OUT/gpu_tests.log 2>&1; echo "pytest rc $?" >> $OUT/gpu_tests.log; tail -3 $OUT/gpu_tests.log
}
bench() {
  local B="python3 -m nanoserve bench"
  $B latency --device cuda --model gpt2-xl --out $OUT/xl > $OUT/xl.log 2>&1
  # A/B in the same lease: the split-K merge as a second kernel (the textbook two launches)
  python3 -c "import sys, nanoserve.kernels as k; k.MERGE_IN_SPLIT_KERNEL = False
from nanoserve.__main__ import main; sys.exit(main(sys.argv[1:]))" \
    bench latency --device cuda --model gpt2-xl --no-compare-hf --out $OUT/xl_two_launch > $OUT/xl_two_launch.log 2>&1
  $B latency --device cuda --model gpt2 --out $OUT/gpt2 > $OUT/gpt2.log 2>&1
  $B throughput --device cuda --model gpt2 --no-compare-hf --out $OUT/tp > $OUT/tp.log 2>&1
  $B throughput --device cuda --model gpt2 --no-compare-hf --out $OUT/tp2 > $OUT/tp2.log 2>&1
  grep -h '"nanoserve_ms_per_token"\|"nanoserve_tok_s"\|"hf_ms_per_token"\|wall_ms_per_step\|gpu_kernel_ms_per_step\|kernels_per_step\|"workload"' $OUT/*.log
}
case ${1:-all} in tests) tests ;; bench) bench ;; all) tests; bench ;; esac
