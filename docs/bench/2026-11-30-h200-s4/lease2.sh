#!/usr/bin/env bash
# Lease 2: the new_kv kernel (write after the loop) and the prompt graphs, measured; where the
# host's time goes on the GPU machine. bash docs/bench/2026-11-30-h200-s4/lease2.sh
set -uo pipefail
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 docs/bench/2026-11-30-h200-s4/new_kv_bench.py > $OUT/new_kv_bench.log 2>&1; tail -4 $OUT/new_kv_bench.log
python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
  -k "prompt_graphs or fused or graphs_equal or decode" > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log
OMP_NUM_THREADS=1 python3 docs/bench/2026-11-30-h200-s3/host_step.py > $OUT/host_step.log 2>&1; tail -2 $OUT/host_step.log
python3 docs/bench/2026-11-30-h200-s4/host_profile.py > $OUT/host_profile.log 2>&1; head -30 $OUT/host_profile.log
python3 -m nanoserve bench latency --device cuda --model gpt2-xl --no-compare-hf --out $OUT/xl > $OUT/xl.log 2>&1
grep -h '"nanoserve_ms_per_token"\|tpot_ms"\|ttft_ms"\|wall_ms_per_step\|gpu_kernel_ms_per_step\|kernels_per_step' $OUT/xl.log | head -8
