"""A/B in one process: eager vs fused_decode=True engines, 1 x 32->128, alternating rounds.

    PYTHONPATH=. OMP_NUM_THREADS=2 python docs/bench/2026-11-30-cpu/fused_decode_ab.py float32 none
    (dtype: float32 | bfloat16; quantization: none | int8). BENCHMARKS.md, issue 12, has the results.
"""
import sys, time, os, torch
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
dtype = sys.argv[1]; quant = None if sys.argv[2] == "none" else sys.argv[2]
kw = dict(device="cpu", dtype=dtype, quantization=quant, quiet=True, enable_prefix_caching=False, compile_cpu_attention=True)
eager = LLM(str(ckpt), **kw)
t0 = time.perf_counter()
fused = LLM(str(ckpt), fused_decode=True, **kw)
warm = random_prompts(2, 40, 40, seed=1)
for l in (eager, fused):
    run_nanoserve(l, warm[:1], 4); run_nanoserve(l, warm, 4)
print(f"{dtype} {quant}: fused engine + warm-up (compile) {time.perf_counter() - t0:.0f} s", flush=True)
prompts = random_prompts(1, 32, 32)
load = lambda: open("/proc/loadavg").read().split()[0]
for r in range(int(os.environ.get("ROUNDS", "3"))):
    for name, l in (("eager", eager), ("fused", fused)):
        dt, n = run_nanoserve(l, prompts, 128)
        print(f"{dtype} {quant} round {r} {name}: {n / dt:.1f} tok/s  load {load()}", flush=True)
