import sys, time, torch
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, dtype=sys.argv[1], quantization=None if sys.argv[2]=="none" else sys.argv[2])
eng = llm.engine
inner = eng.runner.cpu_decode
acc = [0.0, 0]
def timed(*a):
    t = time.perf_counter(); r = inner(*a); acc[0] += time.perf_counter() - t; acc[1] += 1; return r
eng.runner.cpu_decode = timed
eng.add_request("p", random_prompts(1, 32, 32)[0], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
for _ in range(10): eng.step()
for rep in range(3):
    acc[:] = [0.0, 0]
    t = time.perf_counter()
    for _ in range(60): eng.step()
    w = (time.perf_counter() - t) / 60 * 1000
    print(f"engine step {w:.2f} ms, C++ step {acc[0]/acc[1]*1000:.2f} ms, outside {w - acc[0]/acc[1]*1000:.2f} ms")
import cProfile, pstats
eng.runner.cpu_decode = inner
cProfile.run("for _ in range(60): eng.step()", "/tmp/ovh.prof")
pstats.Stats("/tmp/ovh.prof").sort_stats("tottime").print_stats(18)
