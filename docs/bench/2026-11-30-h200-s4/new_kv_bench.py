"""GPU experiment: a decode step's K/V write as its own kernel (write_kv, then attention) or
inside the decode-attention kernel (paged_attention(new_kv=...)), at the two shapes that matter:

  gpt2 x 256   the throughput workload mid-run: 12 layers, 12 heads, contexts 224-704, one pass
  xl x 1       the latency workload: 48 layers, 25 heads, a 160-token context, split-K (P = 16
               under a CUDA graph's n_ctx bound), with its reduce kernel

    PYTHONPATH=$PWD python docs/bench/2026-11-30-h200-s4/new_kv_bench.py

Each variant: one CUDA graph of all layers' calls, timed by CUDA events over 50 replays. The
outputs of the two variants are compared (they must agree to fp16 rounding).
"""
import math, random
import torch
from nanoserve import kernels
from nanoserve.attention import AttentionMetadata


def make(L, H, S, ctxs, D=64, BS=16, n_ctx=1024):
    mbs = [math.ceil(c / BS) for c in ctxs]
    NB = sum(mbs) + 1
    pool = torch.randn(L, 2, NB, H, BS, D, dtype=torch.float16, device="cuda").transpose(3, 4)
    qkv = torch.randn(L, S, 3, H, D, dtype=torch.float16, device="cuda")
    perm = torch.randperm(NB - 1).tolist()
    bt = torch.zeros(S, n_ctx // BS, dtype=torch.int32)
    slots, i = [], 0
    for s, mb in enumerate(mbs):
        bt[s, :mb] = torch.tensor(perm[i:i + mb]); i += mb
        p = ctxs[s] - 1
        slots.append(int(bt[s, p // BS]) * BS + p % BS)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device="cuda"), block_tables=bt.cuda(),
                             context_lens=torch.tensor(ctxs, dtype=torch.int32, device="cuda"),
                             query_start_loc=torch.arange(S + 1, dtype=torch.int32, device="cuda"),
                             max_query_len=1, max_context_len=n_ctx)
    return qkv, pool, meta


def time_us(fn, reps=50):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps


def run(name, L, H, S, ctxs):
    qkv, pool, meta = make(L, H, S, ctxs)
    scale = 64 ** -0.5

    def separate():
        outs = []
        for l in range(L):
            q, k, v = qkv[l].unbind(1)
            kernels.write_kv(k, v, pool[l, 0], pool[l, 1], meta.slot_mapping)
            outs.append(kernels.paged_attention(q, pool[l, 0], pool[l, 1], meta, scale))
        return outs

    def fused():
        outs = []
        for l in range(L):
            q, k, v = qkv[l].unbind(1)
            outs.append(kernels.paged_attention(q, pool[l, 0], pool[l, 1], meta, scale, new_kv=(k, v)))
        return outs

    a, b = separate(), fused()
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    t_sep, t_fused = time_us(separate), time_us(fused)
    print(f"{name}: write_kv + attention {t_sep:.1f} us/step, attention with new_kv {t_fused:.1f} us/step "
          f"({(t_sep - t_fused) / L:+.2f} us a layer saved), max diff {err:.1e}", flush=True)
    assert err < 2e-3


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    rng = random.Random(0)
    run("gpt2 x 256", 12, 12, 256, [rng.randint(32, 512) + 192 for _ in range(256)])
    run("xl x 1", 48, 25, 1, [160])
    run("xl x 1, ctx 1000", 48, 25, 1, [1000])
