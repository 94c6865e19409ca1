"""A/B in one process: the engine with cpu_gemv's one-token kernels against the same engine
with them switched off (oneDNN, as before), on the bench's workloads, alternating rounds.

    PYTHONPATH=. OMP_NUM_THREADS=2 python docs/bench/2026-11-30-cpu-gemv/engine_ab.py float32 none [fused]
    (dtype: float32 | bfloat16; quantization: none | int8; "fused": fused_decode=True, both engines;
    the second engine then runs what the compiled step ran before: Inductor's loop in fp32, oneDNN otherwise)
Prints tok/s per round with the 1-minute load. BENCHMARKS.md, issue 12, third session, has the results.
"""
import os
import sys
import time
from pathlib import Path

from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM

ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
dtype = sys.argv[1]
quant = None if sys.argv[2] == "none" else sys.argv[2]
fused = len(sys.argv) > 3 and sys.argv[3] == "fused"
kw = dict(device="cpu", dtype=dtype, quantization=quant, quiet=True, enable_prefix_caching=False,
          compile_cpu_attention=True, fused_decode=fused)
t0 = time.perf_counter()
llms = {"gemv": LLM(str(ckpt), **kw), "onednn": LLM(str(ckpt), **kw)}
for mod in llms["onednn"].engine.model.modules():           # switch the kernels off in the second
    if getattr(mod, "gemv_weight", None) is not None:
        if fused and dtype == "float32" and quant is None:
            # as before: the compiled fp32 step runs Inductor's loop (linear.gemv) on plain weights
            wp = mod.gemv_weight                                   # (O/16, K, 16, 1) -> (O, K)
            mod.weight = wp.permute(0, 2, 1, 3).reshape(-1, wp.shape[1])[:mod.out_features].contiguous()
        mod.gemv_weight = None
assert type(llms["gemv"].engine.model.fast_head).__name__ in ("PackedLinear", "Int8Linear")
warm = random_prompts(2, 40, 40, seed=1)
for llm in llms.values():
    run_nanoserve(llm, warm[:1], 4)
    run_nanoserve(llm, warm, 4)
print(f"{dtype} {quant} fused={fused}: load + warm-up {time.perf_counter() - t0:.0f} s", flush=True)
workloads = [(1, 32, 128)] + ([(8, 32, 128), (32, 64, 64)] if os.environ.get("BATCHED") else [])
load = lambda: open("/proc/loadavg").read().split()[0]
for r in range(int(os.environ.get("ROUNDS", "3"))):
    for bs, plen, new in workloads:
        prompts = random_prompts(bs, plen, plen)
        for name, llm in llms.items():
            dt, n = run_nanoserve(llm, prompts, new)
            print(f"{dtype} {quant} fused={fused} {bs}x{plen}->{new} round {r} {name}: {n / dt:.1f} tok/s  load {load()}",
                  flush=True)
