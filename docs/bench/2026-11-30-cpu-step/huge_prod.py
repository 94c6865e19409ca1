import statistics, sys, time, torch
from pathlib import Path
from nanoserve import cpu_gemv
from nanoserve.bench import checkpoint_for
from nanoserve.llm import LLM
from nanoserve.attention import AttentionMetadata
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
kw = dict(device="cpu", quiet=True, enable_prefix_caching=False, dtype=sys.argv[1], quantization=None if sys.argv[2] == "none" else sys.argv[2])
huge = LLM(str(ckpt), **kw)
real = cpu_gemv.huge_pages_empty
cpu_gemv.huge_pages_empty = lambda shape, dtype: torch.empty(shape, dtype=dtype)
plain = LLM(str(ckpt), **kw)
cpu_gemv.huge_pages_empty = real
def mods(llm):
    m = llm.engine.model
    return [x for b in m.h for x in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)] + [m.fast_head]
xs = {768: torch.randn(1, 768), 3072: torch.randn(1, 3072)}
def prod(llm):
    t = time.perf_counter()
    for mod in mods(llm):
        K = mod.gemv_weight.shape[1] * (4 // mod.gemv_weight.element_size())
        mod(xs[K])
    return (time.perf_counter() - t) * 1e3
ctx = 100
meta = AttentionMetadata(slot_mapping=torch.tensor([ctx-1]), block_tables=torch.arange(8, dtype=torch.int32)[None], context_lens=torch.tensor([ctx], dtype=torch.int32), query_start_loc=torch.tensor([0,1], dtype=torch.int32), max_query_len=1, max_context_len=ctx)
ids, pos = torch.tensor([5]), torch.tensor([ctx-1])
def step(llm):
    t = time.perf_counter(); llm.engine.runner.cpu_decode(ids, pos, llm.engine.kv_cache, meta); return (time.perf_counter() - t) * 1e3
with torch.inference_mode():
    for _ in range(3): prod(huge); prod(plain); step(huge); step(plain)
    r = {k: [] for k in ("prod huge", "prod plain", "step huge", "step plain")}
    for _ in range(30):
        r["prod huge"].append(prod(huge)); r["prod plain"].append(prod(plain))
        r["step huge"].append(step(huge)); r["step plain"].append(step(plain))
for k, v in r.items(): print(f"{sys.argv[1]}/{sys.argv[2]} {k}: median {statistics.median(v):.3f} ms")
import re
def flags(addr):
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(a, 16) for a in head.split("-")); inside = lo <= addr < hi; size_line = None
        elif inside and line.startswith("AnonHugePages:"):
            ahp = line.split()[1]
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:], ahp
for name, llm in (("huge", huge), ("plain", plain)):
    w = llm.engine.model.fast_head.gemv_weight
    print(name, w.data_ptr() % (2 << 20), flags(w.data_ptr()))
