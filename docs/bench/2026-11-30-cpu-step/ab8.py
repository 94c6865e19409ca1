"""One process: 8 x 32->128 with the C++ step for up to 8 sequences (default) against model.py
for every step (fused_decode=False; its products run cpu_gemv's 8-row kernel too), alternating.
    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python ab8.py bfloat16 none 4"""
import statistics, sys
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts, run_nanoserve
from nanoserve.llm import LLM
from nanoserve import SamplingParams
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
kw = dict(device="cpu", quiet=True, enable_prefix_caching=False, compile_cpu_attention=True, dtype=sys.argv[1],
          quantization=None if sys.argv[2] == "none" else sys.argv[2])
engines = {"cpp": LLM(str(ckpt), **kw), "model.py": LLM(str(ckpt), fused_decode=False, **kw)}
prompts = random_prompts(8, 32, 32, seed=3)
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
toks = {n: [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] for n, llm in engines.items()}
res = {n: [] for n in engines}
for r in range(int(sys.argv[3])):
    for n, llm in engines.items():
        dt, k = run_nanoserve(llm, prompts, 128)
        res[n].append(k / dt)
for n, v in res.items():
    print(f"{sys.argv[1]}/{sys.argv[2]} 8 x 32->128 {n:8s}: median {statistics.median(v):6.1f} tok/s {[round(x) for x in v]}"
          f"  same tokens: {toks[n] == toks['model.py']}")
