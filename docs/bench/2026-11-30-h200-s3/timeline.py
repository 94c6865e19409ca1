"""GPU experiment: where the throughput workload's wall time goes (256 x [32, 512] -> 384, gpt2,
fp16). One engine as `bench throughput` builds it; after a warm-up the workload runs once with
per-step host timestamps (tokens per step, prefill vs decode), then once under torch.profiler
(GPU kernel time summed by kernel and by step kind)."""
import json, sys, time
from collections import defaultdict
from pathlib import Path
import torch
from nanoserve.bench import checkpoint_for, random_prompts
from nanoserve.llm import LLM
from nanoserve.sequence import SamplingParams

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
ckpt = checkpoint_for("gpt2", Path("/tmp/ckpts"))
llm = LLM(str(ckpt), device="cuda", dtype="float16", enable_prefix_caching=False, quiet=True)
eng = llm.engine
prompts = random_prompts(256, 32, 512)
sp = SamplingParams(temperature=0.0, max_tokens=384, ignore_eos=True)
llm.generate(random_prompts(16, 32, 64, seed=1), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)

steps = []
orig = eng.step
def timed_step(*a, **k):
    t = time.perf_counter(); r = orig(*a, **k); t1 = time.perf_counter()
    rec = eng.last_step
    n_pre = sum(s.num_new_tokens for s in rec.scheduled if s.phase == "prefill") if rec else 0
    n_dec = sum(1 for s in rec.scheduled if s.phase == "decode") if rec else 0
    steps.append((t, t1, n_pre, n_dec))
    return r
eng.step = timed_step
for rnd in range(2):
    steps.clear()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    pre = [s for s in steps if s[2] > 0]
    dec = [s for s in steps if s[2] == 0 and s[3] > 0]
    res = {"round": rnd, "wall_s": wall, "tok_s": n / wall, "steps": len(steps),
           "prefill_steps": len(pre), "prefill_step_ms": [round(1000 * (s[1] - s[0]), 2) for s in pre],
           "prefill_tokens": [s[2] for s in pre], "decode_rows_in_prefill_steps": [s[3] for s in pre],
           "decode_steps": len(dec), "decode_ms_total": 1000 * sum(s[1] - s[0] for s in dec),
           "decode_ms_by_batch": {}, "gap_ms_total": 1000 * (wall - sum(s[1] - s[0] for s in steps))}
    by = defaultdict(list)
    for s in dec:
        by[s[3] // 32 * 32].append(1000 * (s[1] - s[0]))
    res["decode_ms_by_batch"] = {k: [len(v), round(sum(v) / len(v), 3)] for k, v in sorted(by.items())}
    print(json.dumps(res), flush=True)
(out / "timeline.json").write_text(json.dumps(res, indent=1))
eng.step = orig
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    torch.cuda.synchronize(); t0 = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    torch.cuda.synchronize(); pwall = time.perf_counter() - t0
ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
gpu = sum(e.self_device_time_total for e in ev) / 1000
top = sorted(ev, key=lambda e: -e.self_device_time_total)[:20]
prof_res = {"profiled_wall_ms": 1000 * pwall, "gpu_kernel_ms": gpu,
            "top": {e.key[:80]: [round(e.self_device_time_total / 1000, 2), e.count] for e in top}}
print(json.dumps(prof_res, indent=1))
(out / "profile.json").write_text(json.dumps(prof_res, indent=1))
