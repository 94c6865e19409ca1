"""A/B in one process: the C++ one-token step (default) vs fused.compile_cpu_decode vs eager,
1 x 32->128, GPT-2 124M shapes, random weights.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python docs/bench/2026-11-30-cpu-step/engine_ab.py float32 int8 5
    (or: bfloat16 none 5)
"""
import sys, time, statistics, torch
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
from nanoserve.fused import compile_cpu_decode
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
kw = dict(dtype=sys.argv[1], quantization=None if sys.argv[2] == "none" else sys.argv[2])
engines = {}
engines["cpp"] = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, **kw)
assert engines["cpp"].engine.runner.cpu_decode is not None
engines["compiled"] = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, fused_decode=True, **kw)
engines["compiled"].engine.runner.cpu_decode = compile_cpu_decode(engines["compiled"].engine.model)
engines["eager"] = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, fused_decode=False, **kw)
prompts = random_prompts(1, 32, 32, seed=3)
toks = {}
for name, llm in engines.items():
    run_nanoserve(llm, prompts, 16)
    toks[name] = llm.generate(prompts, __import__("nanoserve").SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
res = {n: [] for n in engines}
for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
    for name, llm in engines.items():
        dt, n = run_nanoserve(llm, prompts, 128)
        res[name].append(n / dt)
for name, v in res.items():
    print(f"{sys.argv[1]}/{sys.argv[2]} {name:9s} median {statistics.median(v):6.1f} tok/s  {[round(x,1) for x in v]}  same tokens as eager: {toks[name] == toks['eager']}")
