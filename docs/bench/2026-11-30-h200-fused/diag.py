"""Why do fused and eager-graph fp32 tokens differ? Margins at the first divergence."""
import random, sys, torch
sys.path.insert(0, "tests")
from pathlib import Path
from conftest import make_hf_model, save_checkpoint
from nanoserve import LLM, SamplingParams
ck = save_checkpoint(make_hf_model(), Path("/tmp/diag_ckpt"))
def prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(50256) for _ in range(rng.randint(1, 70))] for _ in range(n)]
P = prompts(20, 4)
sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
kw = dict(device="cuda", dtype="float32", quiet=True, num_blocks=256)
order = sys.argv[1] if len(sys.argv) > 1 else "fused_first"
engines = {}
names = ["fused", "eager_graphs", "enforce_eager"] if order == "fused_first" else ["eager_graphs", "fused", "enforce_eager"]
for name in names:
    engines[name] = LLM(str(ck), fused_decode={"fused": None, "eager_graphs": False, "enforce_eager": None}[name],
                        enforce_eager=name == "enforce_eager", **kw)
cpu = LLM(str(ck), device="cpu", quiet=True)
outs = {n: e.generate(P, sp, use_tqdm=False) for n, e in engines.items()}
outs["cpu"] = cpu.generate(P, sp, use_tqdm=False)
print("order", order)
for n in outs:
    if n == "cpu": continue
    bad = 0
    for i, (a, b) in enumerate(zip(outs[n], outs["cpu"])):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if ta != tb:
            bad += 1
            j = next(k for k in range(len(ta)) if ta[k] != tb[k])
            lb = sorted(b.outputs[0].logprobs[j].values(), reverse=True)
            la = a.outputs[0].logprobs[j]
            if bad <= 3:
                print(f"  {n}: prompt {i} (len {len(P[i])}) diverges at {j}: cpu margin {lb[0]-lb[1]:.2e}; {n} lp {la}; cpu lp {b.outputs[0].logprobs[j]}")
    print(f"{n}: {bad} of {len(P)} prompts differ from cpu")
