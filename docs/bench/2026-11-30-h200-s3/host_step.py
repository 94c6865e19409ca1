"""The engine's host work per decode step at batch 256, without a model: the GPT-2 forward and
logits are replaced by precomputed tensors, so what is timed is scheduling, preparing the
inputs, sampling bookkeeping and applying the results (async scheduling, as on a GPU).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/bench/2026-11-30-h200-s3/host_step.py

Prints ms per step, in all and per engine/runner method (the last line with the runner's parts).
"""
import time, sys, torch, collections
from nanoserve.bench import random_prompts
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams
llm = LLM("weights/nanoserve-stdlib-tiny", device="cpu", enable_prefix_caching=False, quiet=True,
          async_scheduling=True, max_num_seqs=256, num_blocks=8192)
eng = llm.engine
m = eng.model
C, V = m.config.n_embd, m.num_logits
zh = torch.zeros(8192, C); zl = torch.randn(256, 64)
m.forward = lambda ids, pos, kv, meta, *a, **k: zh[:ids.shape[0]]
m.compute_logits = lambda h: zl[:h.shape[0]]
T = collections.defaultdict(float)
def wrap(obj, name):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - t; return r
    setattr(obj, name, g)
for o, n in [(eng.scheduler, "schedule"), (eng.runner, "prepare"), (eng, "_advance"), (eng, "_finish"), (eng.runner, "collect"), (eng.runner, "sampler"), (eng, "_held")]:
    wrap(o, n)
for i, p in enumerate(random_prompts(256, 100, 300, vocab=V)):
    eng.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
for _ in range(20): eng.step(finished_only=True)
for r in range(3):
    T.clear()
    t = time.perf_counter()
    for _ in range(50): eng.step(finished_only=True)
    tot = (time.perf_counter() - t) / 50 * 1000
    print(f"host ms/step {tot:.3f}", {k: round(v / 50 * 1000, 3) for k, v in T.items()}, flush=True)
run = eng.runner
for n in ["_flatten_tokens", "_block_table_rows"]:
    wrap(run, n)
import nanoserve.runner as R
f_up = R._upload
def up(*a, **k):
    t = time.perf_counter(); r = f_up(*a, **k); T["_upload"] += time.perf_counter() - t; return r
R._upload = up
T.clear()
for _ in range(50): eng.step(finished_only=True)
print({k: round(v / 50 * 1000, 3) for k, v in T.items()})
