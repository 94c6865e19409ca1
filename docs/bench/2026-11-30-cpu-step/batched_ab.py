"""bf16 8 x 32->128 in this checkout: tok/s, 4 rounds."""
import sys, statistics
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
import nanoserve
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, dtype="bfloat16", compile_cpu_attention=True)
prompts = random_prompts(8, 32, 32, seed=3)
run_nanoserve(llm, prompts, 16)
v = []
for r in range(4):
    dt, n = run_nanoserve(llm, prompts, 128); v.append(n / dt)
print(f"{nanoserve.__file__.split('/')[2]}: median {statistics.median(v):.1f} {[round(x) for x in v]}")
