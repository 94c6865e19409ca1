"""bf16 1 x 32->128 with and without transparent huge pages for torch's allocations: run alternately
with THP_MEM_ALLOC_ENABLE=0 and =1. PYTHONPATH=$PWD python docs/bench/2026-11-30-cpu-step/thp_ab.py bfloat16 none"""
import sys, statistics, os
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, dtype=sys.argv[1], quantization=None if sys.argv[2]=="none" else sys.argv[2])
prompts = random_prompts(1, 32, 32, seed=3)
run_nanoserve(llm, prompts, 16)
v = []
for r in range(4):
    dt, n = run_nanoserve(llm, prompts, 128); v.append(n / dt)
huge = [l for l in open("/proc/self/smaps_rollup") if "AnonHuge" in l][0].split()[1]
print(f"THP={os.environ.get('THP_MEM_ALLOC_ENABLE','0')} {sys.argv[1]}/{sys.argv[2]}: median {statistics.median(v):.1f} tok/s {[round(x) for x in v]} AnonHuge {int(huge)//1024} MiB")
