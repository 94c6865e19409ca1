"""A/B in one process: bf16 fused_decode=True engines whose compiled step runs oneDNN's packed bf16
kernels (as committed) or linear.gemv on plain bf16 weights (keep_weight forced on), 1 x 32->128.

    PYTHONPATH=. OMP_NUM_THREADS=2 python docs/bench/2026-11-30-cpu/bf16_gemv_ab.py
BENCHMARKS.md, issue 12 ("Several accumulators per row"), has the results.
"""
import os, time
from pathlib import Path
from nanoserve import linear
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM

ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
kw = dict(device="cpu", dtype="bfloat16", quiet=True, enable_prefix_caching=False,
          compile_cpu_attention=True, fused_decode=True)
onednn = LLM(str(ckpt), **kw)
init = linear.PackedLinear.__init__
linear.PackedLinear.__init__ = lambda self, w, b, keep_weight=False: init(self, w, b, True)
gemv = LLM(str(ckpt), **kw)
linear.PackedLinear.__init__ = init
t0 = time.perf_counter()
warm = random_prompts(2, 40, 40, seed=1)
for l in (onednn, gemv):
    run_nanoserve(l, warm[:1], 4); run_nanoserve(l, warm, 4)
print(f"compile + warm-up {time.perf_counter() - t0:.0f} s", flush=True)
prompts = random_prompts(1, 32, 32)
load = lambda: open("/proc/loadavg").read().split()[0]
for r in range(int(os.environ.get("ROUNDS", "3"))):
    for name, l in (("onednn", onednn), ("gemv", gemv)):
        dt, n = run_nanoserve(l, prompts, 128)
        print(f"bf16 round {r} {name}: {n / dt:.1f} tok/s  load {load()}", flush=True)
