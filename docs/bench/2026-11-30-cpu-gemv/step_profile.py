"""torch.profiler over 40 one-token steps of the compiled CPU decode step (fused_decode=True),
GPT-2 124M shapes, random weights: where a batch-1 step goes outside the products.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python docs/bench/2026-11-30-cpu-gemv/step_profile.py bfloat16 none
    (or: float32 int8)
"""
import sys, time, torch
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
dtype, quant = sys.argv[1], (None if sys.argv[2] == "none" else sys.argv[2])
llm = LLM(str(ckpt), device="cpu", dtype=dtype, quantization=quant, quiet=True, enable_prefix_caching=False,
          compile_cpu_attention=True, fused_decode=True)
run_nanoserve(llm, random_prompts(1, 40, 40, seed=1), 8)
eng = llm.engine
eng.add_request("p", random_prompts(1, 32, 32)[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
for _ in range(10): eng.step()
t = time.perf_counter()
for _ in range(40): eng.step()
print(f"wall {(time.perf_counter() - t) / 40 * 1000:.2f} ms/step")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(40): eng.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
