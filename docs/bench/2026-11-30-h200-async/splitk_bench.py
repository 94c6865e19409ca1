"""Split-K vs one-pass Triton decode attention on a GPU: time per call, and agreement.

Run from the repository root on the GPU machine:
    PYTHONPATH=$PWD python docs/bench/2026-11-30-h200-async/splitk_bench.py               # full sweep (about a minute)
    PYTHONPATH=$PWD python docs/bench/2026-11-30-h200-async/splitk_bench.py --quick       # XL batch 1 only
    PYTHONPATH=$PWD python docs/bench/2026-11-30-h200-async/splitk_bench.py --out $OUT/splitk.json

What it measures: kernels.paged_attention on one decode step (every sequence at the same
context), fp16, block size 16, the engine's cache layout (kv_cache.py: head-major blocks), for
GPT-2 XL (H=25) and 124M (H=12) shapes, D=64. Each timing is a CUDA graph of one call per
layer, each layer over its own slice of the pool (n_layer of them, so the KV does not sit in L2
across calls, as in a real step), replayed and timed with CUDA events; us per call = per layer.
The variants: num_partitions=1 (one pass), None (decode_partitions' choice, printed as "auto=P"),
and forced P = 2, 4, 8, 16. Two host-side bounds: "n_ctx" (max_context_len = 1024, what the
runner's CUDA graphs and fused.py pass, so P is sized for 1024 whatever the real context) and
"exact" (max_context_len = the real context, as in an eager step).
Agreement: every variant's output against the one-pass output (max abs diff, fp16) and the
one-pass output against attention.py's fp32 reference; it fails loudly past 2e-3.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from nanoserve import attention, kernels
from nanoserve.attention import AttentionMetadata

MODELS = {"gpt2-xl": dict(L=48, H=25, D=64), "gpt2": dict(L=12, H=12, D=64)}
BS, N_CTX = 16, 1024
VARIANTS = [1, None, 2, 4, 8, 16]            # num_partitions; None = automatic


def make_step(L: int, H: int, D: int, S: int, ctx: int, bound: int) -> tuple:
    """Random q (L, S, H, D), a pool (L, 2, NB, BS, H, D) stored head-major, and the metadata
    of a decode step where every sequence has `ctx` tokens in permuted blocks."""
    mb = math.ceil(ctx / BS)
    NB = S * mb + 1
    pool = torch.randn(L, 2, NB, H, BS, D, dtype=torch.float16, device="cuda").transpose(3, 4)
    q = torch.randn(L, S, H, D, dtype=torch.float16, device="cuda")
    block_tables = torch.randperm(NB - 1, device="cuda")[:S * mb].view(S, mb).to(torch.int32)   # (S, MB)
    # The runner's graphs pass a table n_ctx wide; pad it so the reference sees the same bound.
    block_tables = torch.cat([block_tables, torch.zeros(S, N_CTX // BS - mb, dtype=torch.int32,
                                                        device="cuda")], 1)
    meta = AttentionMetadata(slot_mapping=torch.full((S,), -1, dtype=torch.int64, device="cuda"),
                             block_tables=block_tables,
                             context_lens=torch.full((S,), ctx, dtype=torch.int32, device="cuda"),
                             query_start_loc=torch.arange(S + 1, dtype=torch.int32, device="cuda"),
                             max_query_len=1, max_context_len=bound)
    return q, pool, meta


def time_us(fn, reps: int = 20) -> float:
    """Capture fn (one call per layer) in a CUDA graph; replay it; us per replay."""
    fn()                                              # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="GPT-2 XL at batch 1 only")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, {kernels._num_sms(dev)} SMs, torch {torch.__version__}, "
          f"triton {kernels.triton.__version__}; us per call (one layer), CUDA graph of n_layer calls")
    rows = []
    models = {"gpt2-xl": MODELS["gpt2-xl"]} if args.quick else MODELS
    for name, m in models.items():
        for S in ([1] if args.quick else [1, 2, 4, 8]):
            for ctx in [64, 128, 256, 512, 1024]:
                for bound_name in ["n_ctx", "exact"]:
                    bound = N_CTX if bound_name == "n_ctx" else ctx
                    q, pool, meta = make_step(m["L"], m["H"], m["D"], S, ctx, bound)
                    scale = m["D"] ** -0.5
                    auto = kernels.decode_partitions(S, m["H"], bound, None, 64, kernels._num_sms(dev))

                    def call(P, layer):
                        return kernels.paged_attention(q[layer], pool[layer, 0], pool[layer, 1], meta, scale,
                                                       num_partitions=P)
                    one_pass = call(1, 0).float()
                    want = attention.paged_attention(q[0].float(), pool[0, 0].float(), pool[0, 1].float(), meta, scale)
                    ref_err = (one_pass - want).abs().max().item()
                    times, errs = {}, {}
                    for P in VARIANTS:
                        errs[P] = (call(P, 0).float() - one_pass).abs().max().item()
                        times[P] = time_us(lambda: [call(P, layer) for layer in range(m["L"])]) / m["L"]
                    assert ref_err < 2e-3 and max(errs.values()) < 2e-3, (name, S, ctx, ref_err, errs)
                    best = min((t, P) for P, t in times.items() if P is not None)
                    print(f"{name:8s} S={S} ctx={ctx:4d} bound={bound_name:5s} auto={auto:2d} | "
                          + "  ".join(f"{'auto' if P is None else 'P=' + str(P)}:{t:6.2f}" for P, t in times.items())
                          + f" | best P={best[1]} ({times[1] / best[0]:.2f}x one pass)"
                          + f" | err vs one pass {max(errs.values()):.1e}, one pass vs ref {ref_err:.1e}")
                    rows.append(dict(model=name, S=S, ctx=ctx, bound=bound_name, auto_P=auto,
                                     us_per_call={str(P): t for P, t in times.items()},
                                     max_err_vs_one_pass=max(errs.values()), one_pass_vs_ref=ref_err))
                    del q, pool, meta
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
