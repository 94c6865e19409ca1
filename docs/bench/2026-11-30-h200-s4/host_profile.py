"""Where the host's time goes in the throughput workload's decode steps, on the GPU machine:
cProfile over 40 steady decode steps of 256 sequences (gpt2, fp16, random weights, the
engine as `bench throughput` builds it), sorted by own time. The profiler slows Python down
about 3x; the shares are what matter. Also: the same steps' wall time without the profiler.

    PYTHONPATH=$PWD python docs/bench/2026-11-30-h200-s4/host_profile.py
"""
import cProfile, io, pstats, tempfile, time
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams

with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoint_for("gpt2", Path(tmp))
    llm = LLM(str(ckpt), device="cuda", dtype="float16", quiet=True, enable_prefix_caching=False)
    eng = llm.engine
    for i, p in enumerate(random_prompts(256, 32, 512)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True))
    for _ in range(40):
        eng.step(finished_only=True)                 # prefill, then decode
    t = time.perf_counter()
    for _ in range(40):
        eng.step(finished_only=True)
    print(f"wall {(time.perf_counter() - t) / 40 * 1000:.3f} ms/step (256 sequences decoding)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(40):
        eng.step(finished_only=True)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    print(s.getvalue())
