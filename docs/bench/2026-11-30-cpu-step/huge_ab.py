"""One process, two engines: cpu_gemv's packed weights on transparent huge pages (as pack() does
now) and on ordinary pages (huge_pages_empty replaced by torch.empty while that engine loads);
5 alternating rounds of 1 x 32->128, tok/s.
    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python huge_ab.py bfloat16 none   (or float32 int8, float32 none)"""
import statistics, sys, torch
from pathlib import Path
from nanoserve import cpu_gemv
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
kw = dict(device="cpu", quiet=True, enable_prefix_caching=False, dtype=sys.argv[1],
          quantization=None if sys.argv[2] == "none" else sys.argv[2])
huge = LLM(str(ckpt), **kw)
real = cpu_gemv.huge_pages_empty
cpu_gemv.huge_pages_empty = lambda shape, dtype: torch.empty(shape, dtype=dtype)
plain = LLM(str(ckpt), **kw)
cpu_gemv.huge_pages_empty = real
prompts = random_prompts(1, 32, 32, seed=3)
res = {"huge": [], "plain": []}
for llm in (huge, plain):
    run_nanoserve(llm, prompts, 16)
for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
    for name, llm in (("huge", huge), ("plain", plain)):
        dt, n = run_nanoserve(llm, prompts, 128)
        res[name].append(n / dt)
print("AnonHugePages:", [l.split()[1] for l in open("/proc/self/smaps_rollup") if "AnonHuge" in l][0], "kB")
for name, v in res.items():
    print(f"{sys.argv[1]}/{sys.argv[2]} {name:5s}: median {statistics.median(v):6.1f} tok/s {[round(x, 1) for x in v]}")
