"""GPU experiment: XL / gpt2 batch-1 decode under inductor config variants (one variant per process)."""
import json, sys, time
from pathlib import Path
import torch
import torch._inductor.config as ic
variant, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
flags = {}
if "cdt" in variant:
    flags["coordinate_descent_tuning"] = True
if "mat" in variant:
    flags["max_autotune"] = True
if "dmm" in variant:
    flags["decompose_mem_bound_mm"] = True
for k, v in flags.items():
    print(k, "exists" if hasattr(ic, k) else "MISSING")
    setattr(ic, k, v)
from nanoserve.bench import checkpoint_for, random_prompts
from nanoserve.bench_gpu import profile_decode
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams
ckpt = checkpoint_for(model, Path("/tmp/ckpts"))
t0 = time.perf_counter()
llm = LLM(str(ckpt), device="cuda", dtype="float16", max_num_seqs=1, enable_prefix_caching=False, quiet=True)
build = time.perf_counter() - t0
prompt = random_prompts(1, 32, 32)
sp = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
runs = []
for _ in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    o = llm.generate(prompt, sp, use_tqdm=False)
    runs.append(1000 * (time.perf_counter() - t) / 256)
prof = profile_decode(llm, prompt, 30)
res = dict(variant=variant, model=model, build_s=build, ms_per_token=runs, profile=prof, tokens=o[0].outputs[0].token_ids[:16])
print(json.dumps(res))
(out / f"{model}_{variant}.json").write_text(json.dumps(res, indent=1))
