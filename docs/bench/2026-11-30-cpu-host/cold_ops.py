import sys, time, torch, numpy as np, collections, statistics
from pathlib import Path
from nanoserve.llm import LLM
from nanoserve.bench import checkpoint_for
from nanoserve.sampler import SamplerOutput
from nanoserve.runner import LaunchedStep
big = LLM(str(checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))), device="cpu", quiet=True, dtype="bfloat16")
head = big.engine.model.fast_head
xh = torch.randn(1, 768)
t1 = torch.tensor([1])
def im():
    with torch.inference_mode(): pass
@torch.inference_mode()
def dec(): pass
ops = {"inference_mode with": im, "inference_mode decorated fn": dec, "SamplerOutput": lambda: SamplerOutput(token_ids=t1),
       "LaunchedStep": lambda: LaunchedStep(None, [], {}), "tolist": lambda: t1.tolist(), "int(t[0])": lambda: int(t1[0])}
acc = collections.defaultdict(list)
for i in range(40):
    for k, f in ops.items():
        head(xh)
        t = time.perf_counter(); f(); a = time.perf_counter(); f(); b = time.perf_counter()
        acc[k + " cold"].append(a - t); acc[k + " warm"].append(b - a)
for k, v in acc.items(): print(f"{k:40s} {statistics.median(v)*1e6:.1f} us")
