#!/usr/bin/env bash
# The fourth session's last lease: vLLM 0.26.0 staged onto the GPU machine, then every issue-11
# workload with HF transformers and vLLM in the same run. From the repo root, each line one
# `run` call, back to back (the staged files live in /tmp only while the machine stays warm):
#   STAGE=.stage/vllm bash docs/bench/2026-11-30-h200-s3/vllm_stage.sh append cN   (N = 1..4; carry .stage/vllm/cN)
#   bash docs/bench/2026-11-30-h200-s4/final.sh install      # vLLM into /tmp/vsite, /tmp/vdeps; GPU tests
#   bash docs/bench/2026-11-30-h200-s4/final.sh xl | tp | gpt2 | sweep
# (The four staging calls ran with weights/ moved out of the working tree, so that 59 MiB chunks
# plus the tree fit a call's 64 MiB.)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
B="python3 -m nanoserve bench"
export PYTHONPATH=$PWD:/tmp/vsite:/tmp/vdeps
case $1 in
  install)
    STAGE=.stage/vllm bash docs/bench/2026-11-30-h200-s3/vllm_stage.sh install > $OUT/install.log 2>&1; tail -2 $OUT/install.log
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt 2>&1
    PYTHONPATH=$PWD python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
      -k "prompt_graphs or fused or graphs_equal or async or new_kv or split" > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log ;;
  xl) $B latency --device cuda --model gpt2-xl --compare vllm --out $OUT/xl > $OUT/xl.log 2>&1 ;;
  tp) $B throughput --device cuda --model gpt2 --compare vllm --out $OUT/tp > $OUT/tp.log 2>&1 ;;
  gpt2) $B latency --device cuda --model gpt2 --compare vllm --out $OUT/gpt2 > $OUT/gpt2.log 2>&1 ;;
  sweep) $B sweep --device cuda --model gpt2 --compare vllm --out $OUT/sweep > $OUT/sweep.log 2>&1 ;;
esac
grep -h '"workload"\|_ms_per_token"\|_tok_s"\|ttft_ms"\|vllm_error\|wall_ms_per_step\|gpu_kernel_ms_per_step\|kernels_per_step\|"ratio' \
  $OUT/*.log 2>/dev/null | head -40
