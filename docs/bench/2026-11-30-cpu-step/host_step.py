"""Where an engine step of one int8 sequence goes, outside the C++ step (timers around the runner's
and scheduler's calls). PYTHONPATH=$PWD OMP_NUM_THREADS=2 python docs/bench/2026-11-30-cpu-step/host_step.py"""
import sys, time, torch, collections
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, dtype="float32", quantization="int8")
eng = llm.engine
acc = collections.defaultdict(float)
def wrap(obj, name, key):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc[key] += time.perf_counter() - t; return r
    setattr(obj, name, g)
wrap(eng.runner, "cpu_decode", "cpp_step")
wrap(eng.runner, "prepare", "prepare")
wrap(eng.runner, "sampler", "sampler")
wrap(eng.runner, "collect", "collect")
wrap(eng.scheduler, "schedule", "schedule")
wrap(eng, "_finish", "_finish(incl collect)")
wrap(eng.runner, "launch", "launch(incl prepare, step, sampler)")
eng.add_request("p", random_prompts(1, 32, 32)[0], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
for _ in range(10): eng.step()
acc.clear()
N = 200
t = time.perf_counter()
for _ in range(N): eng.step()
wall = (time.perf_counter() - t) / N * 1e3
print(f"engine.step {wall:.3f} ms")
for k, v in acc.items(): print(f"  {k:40s} {v / N * 1e3:.3f} ms")
