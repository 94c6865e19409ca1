import sys
from pathlib import Path
from nanoserve.bench import checkpoint_for, random_prompts
from nanoserve.llm import LLM
from nanoserve import SamplingParams
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
kw = dict(device="cpu", quiet=True, enable_prefix_caching=False, compile_cpu_attention=True, dtype=sys.argv[1],
          quantization=None if sys.argv[2] == "none" else sys.argv[2])
a, b = LLM(str(ckpt), **kw), LLM(str(ckpt), fused_decode=False, **kw)
prompts = random_prompts(8, 32, 32, seed=3)
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, logprobs=1)
for x, y in zip(a.generate(prompts, sp, use_tqdm=False), b.generate(prompts, sp, use_tqdm=False)):
    tx, ty = x.outputs[0].token_ids, y.outputs[0].token_ids
    first = next((i for i, (p, q) in enumerate(zip(tx, ty)) if p != q), None)
    if first is None:
        print("same")
    else:
        lx = x.outputs[0].logprobs[first]; ly = y.outputs[0].logprobs[first]
        print(f"diverge at {first}: cpp top {sorted(lx.items(), key=lambda kv: -kv[1])[:2]}  model.py {sorted(ly.items(), key=lambda kv: -kv[1])[:2]}")
