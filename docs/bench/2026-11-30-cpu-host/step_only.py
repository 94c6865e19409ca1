import sys, time, torch, statistics, inspect
from pathlib import Path
from nanoserve.bench import checkpoint_for
from nanoserve.llm import LLM
from nanoserve.attention import AttentionMetadata
ckpt = checkpoint_for("gpt2", Path("/tmp/nanoserve_bench_ckpts"))
llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, dtype=sys.argv[1], quantization=None if sys.argv[2]=="none" else sys.argv[2])
step = llm.engine.runner.cpu_decode
kv = llm.engine.kv_cache
ctx = 100
new = "tokens" in inspect.signature(step).parameters
if new:
    call = lambda: step([5], [ctx-1], [ctx-1], [ctx], [list(range(8))], kv, False)
else:
    meta = AttentionMetadata(slot_mapping=torch.tensor([ctx-1]), block_tables=torch.arange(8, dtype=torch.int32)[None], context_lens=torch.tensor([ctx], dtype=torch.int32), query_start_loc=torch.tensor([0,1], dtype=torch.int32), max_query_len=1, max_context_len=ctx)
    ids, pos = torch.tensor([5]), torch.tensor([ctx-1])
    call = lambda: step(ids, pos, kv, meta)
r = []
with torch.inference_mode():
    for _ in range(5): call()
    for _ in range(60):
        t = time.perf_counter(); call(); r.append(time.perf_counter() - t)
print(("new" if new else "old"), sys.argv[1], f"C++ step median {statistics.median(r)*1e3:.2f} ms")
