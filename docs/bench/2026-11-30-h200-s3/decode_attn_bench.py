"""GPU experiment: the decode-attention kernel at the throughput workload's batch (256 x gpt2),
under launch configurations: BLOCK_N (keys per iteration), num_warps, num_stages, and split-K.

    PYTHONPATH=$PWD python docs/bench/2026-11-30-h200-s3/decode_attn_bench.py [--out FILE]

One decode step of GPT-2 124M (12 layers, 12 heads, D=64, block size 16, fp16), 256 sequences
with contexts drawn as in the workload at mid-run (prompt in [32, 512] + 192 generated), in
permuted blocks of the engine's pool layout; each layer over its own slice of the pool, one
CUDA graph of 12 calls, timed by CUDA events. GB/s counts the K and V bytes each step must read.
Each variant's output is checked against the engine's default launch (fails past 2e-3).
"""
import argparse, json, math, random
import torch
from nanoserve import kernels
from nanoserve.attention import AttentionMetadata

L, H, D, BS, S, N_CTX = 12, 12, 64, 16, 256, 1024


def make_step(seed=0):
    rng = random.Random(seed)
    ctx = [rng.randint(32, 512) + 192 for _ in range(S)]
    mbs = [math.ceil(c / BS) for c in ctx]
    NB = sum(mbs) + 1
    pool = torch.randn(L, 2, NB, H, BS, D, dtype=torch.float16, device="cuda").transpose(3, 4)   # head-major blocks
    q = torch.randn(L, S, H, D, dtype=torch.float16, device="cuda")
    perm = torch.randperm(NB - 1).tolist()
    bt = torch.zeros(S, N_CTX // BS, dtype=torch.int32)
    i = 0
    for s, mb in enumerate(mbs):
        bt[s, :mb] = torch.tensor(perm[i:i + mb]); i += mb
    meta = AttentionMetadata(slot_mapping=torch.full((S,), -1, dtype=torch.int64, device="cuda"),
                             block_tables=bt.cuda(), context_lens=torch.tensor(ctx, dtype=torch.int32, device="cuda"),
                             query_start_loc=torch.arange(S + 1, dtype=torch.int32, device="cuda"),
                             max_query_len=1, max_context_len=N_CTX)
    return q, pool, meta, sum(ctx)


def launch(q, k, v, meta, bn, warps, stages):
    out = torch.empty_like(q)
    args = (q, k, v, out, meta.block_tables, meta.context_lens, meta.query_start_loc,
            D ** -0.5 * kernels.LOG2E, S, S, kernels.NO_WINDOW, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k.stride(0), k.stride(1), k.stride(2), meta.block_tables.stride(0))
    kernels._decode_kernel[(S, H)](*args, D=D, BS=BS, BLOCK_N=bn, BLOCK_D=64, num_warps=warps, num_stages=stages)
    return out


def time_us(fn, reps=20):
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


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--out"); args = ap.parse_args()
    q, pool, meta, tokens = make_step()
    nbytes = L * tokens * 2 * H * D * 2
    print(f"{torch.cuda.get_device_name()}: 256 seqs, {tokens} context tokens, {nbytes / 1e9:.2f} GB of K/V a step")
    ref = [kernels.paged_attention(q[l], pool[l, 0], pool[l, 1], meta, D ** -0.5) for l in range(L)]
    rows = []
    variants = [("auto", None, None, None, None)]
    variants += [(f"P={p}", None, None, None, p) for p in (2, 4)]
    variants += [(f"bn={bn} w={w} st={st}", bn, w, st, None) for bn in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)]
    for name, bn, w, st, p in variants:
        try:
            if bn is None:
                fn = lambda: [kernels.paged_attention(q[l], pool[l, 0], pool[l, 1], meta, D ** -0.5, num_partitions=p) for l in range(L)]
            else:
                fn = lambda: [launch(q[l], pool[l, 0], pool[l, 1], meta, bn, w, st) for l in range(L)]
            outs = fn()
            err = max((o - r).abs().max().item() for o, r in zip(outs, ref))
            us = time_us(fn)
            row = dict(variant=name, us_per_step=round(us, 1), gb_s=round(nbytes / us / 1e3, 0), err=err)
        except Exception as e:
            row = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        print(json.dumps(row), flush=True)
        rows.append(row)
        assert "err" not in row or row["err"] < 2e-3, row
    if args.out:
        open(args.out, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
