"""Issue 12: do several accumulators per row make Inductor's batch-1 GEMV faster?

GPT-2 124M's 12 layers of linears (768->2304, 768->768, 768->3072, 3072->768, distinct
weights: 340 MB in fp32, nothing stays in L3) plus the 50257x768 head, M = 1, each variant
torch.compile'd with freezing as fused.py does, timed alternately in one process.

What Inductor (torch 2.13) generated for each, read with TORCH_LOGS=output_code:

  gemv     linear.gemv: (w * x).sum(1). Per row one loop over K, 16 floats a step, one vector
           accumulator (bf16 weights: VectorizedN<float, 2>, two).
  cC       w viewed (O, C, K/C), reduce the last dim then C: a loop per (row, chunk), each with
           its own accumulator, the partial sums stored to a buffer, then summed. c4 ran 50x slower
           in the whole net (1.2 s a call; not investigated further).
  rC       w viewed (O, C, K/C), reduce C first: the size-C sum is unrolled (Inductor unrolls
           reductions of at most 8 elements) into a loop body that reads C vectors K/C apart and
           makes one accumulator add per C products.
  LN       w viewed (O, K/N, N), reduce K/N first: per row N/16 strided loops, each one accumulator.
  uN       w viewed (O, K/16N, N, 16), reduce the N first: like rC but the N vectors of one step
           are contiguous (16N floats), so the row is still read front to back.
  T        weights stored transposed (K, O), reduce dim 0: vectorized over 16 outputs, walking a
           column (stride O floats) -- codegen inspected only, not timed.
  onednn   linear.PackedLinear (oneDNN's packed weights), the kernel the eager engine uses.
  sum      not a product: eager torch.sum of each weight (ATen's vectorized sum keeps several
           accumulators): how fast this machine reads the weights once, a roofline.

Raw output of the runs reported in BENCHMARKS.md: gemv_accumulators.txt beside this file.

Usage: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python docs/bench/2026-11-30-cpu/gemv_accumulators.py
       [--threads 1] [--dtype float32|bfloat16] [--rounds 7] [--variants gemv,c4,...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanoserve.linear import PackedLinear, gemv

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]   # (O, K) per layer


def split_last(x, w, b, c):      # reduce K/C, then C
    O, K = w.shape
    y = (w.view(O, c, K // c) * x.view(c, K // c)).sum(-1).sum(-1)
    return (y if b is None else y + b)[None]


def split_first(x, w, b, c):     # reduce C, then K/C
    O, K = w.shape
    y = (w.view(O, c, K // c) * x.view(c, K // c)).sum(1).sum(-1)
    return (y if b is None else y + b)[None]


def inner_first(x, w, b, l):     # w viewed (O, K/L, L): reduce K/L (L lanes of partial sums), then L
    O, K = w.shape
    y = (w.view(O, K // l, l) * x.view(K // l, l)).sum(1).sum(-1)
    return (y if b is None else y + b)[None]


def transposed(x, wt, b):        # wt (K, O) = w.T stored contiguous: reduce the outer dim
    y = (wt * x.view(-1, 1)).sum(0)
    return (y if b is None else y + b)[None]


def unrolled(x, w, b, u):        # w viewed (O, K/16u, u, 16): the size-u sum unrolls (<= 8), then one reduction
    O, K = w.shape
    y = (w.view(O, K // (16 * u), u, 16) * x.view(K // (16 * u), u, 16)).sum(2).sum((1, 2))
    return (y if b is None else y + b)[None]


def make_linear(kind: str, w, b):
    if kind[0] == "u":
        return lambda x: unrolled(x, w, b, int(kind[1:]))
    if kind == "T":
        wt = w.t().contiguous()
        return lambda x: transposed(x, wt, b)
    if kind == "onednn":
        return PackedLinear(w, b)
    if kind == "gemv":
        return lambda x: gemv(x, w, b)
    if kind[0] == "L":
        return lambda x: inner_first(x, w, b, int(kind[1:]))
    c = int(kind[1:])
    f = split_last if kind[0] == "c" else split_first
    return lambda x: f(x, w, b, c)


class Net(torch.nn.Module):
    def __init__(self, kind, layers, head, xdtype):
        super().__init__()
        # oneDNN's kernels take x in the weights' dtype
        self.kind, self.xdtype = kind, (head.dtype if kind == "onednn" else xdtype)
        self.lins = [[make_linear(kind, w, b) for w, b in layer] for layer in layers]
        self.mods = torch.nn.ModuleList(m for layer in self.lins for m in layer if isinstance(m, torch.nn.Module))
        self.head = make_linear(kind, head, None)

    def forward(self, x):        # (1, 768) -> (1, V)
        for qkv, o, fc, proj in self.lins:
            h = x.to(self.xdtype)
            a = qkv(h)[:, :768]
            h = (x + o(a.to(self.xdtype)).float()).to(self.xdtype)
            m = fc(h).float()
            x = x + 1e-2 * (a.float() + proj(torch.relu(m).to(self.xdtype)).float())
        return self.head(x.to(self.xdtype))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--xdtype", default=None, help="activation dtype (default: the weights')")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", default="gemv,c2,c4,c8,r2,r4,r8,onednn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    xdtype = getattr(torch, args.xdtype or args.dtype)
    torch.manual_seed(0)
    layers = [[(torch.randn(o, k) * 0.02).to(dtype), (torch.randn(o) * 0.02).to(dtype)] for _ in range(12) for o, k in SHAPES]
    layers = [layers[i:i + 4] for i in range(0, 48, 4)]
    head = (torch.randn(50257, 768) * 0.02).to(dtype)
    x = torch.randn(1, 768)
    nbytes = (sum(w.numel() + b.numel() for layer in layers for w, b in layer) + head.numel()) * head.element_size()

    fns, ref = {}, None
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        for kind in args.variants.split(","):
            if kind == "sum":      # eager torch.sum over every weight (ATen keeps several accumulators)
                weights = [w for layer in layers for w, _ in layer] + [head]
                fns[kind] = lambda x: [w.sum() for w in weights]
                continue
            torch.compiler.reset()
            f = torch.compile(Net(kind, layers, head, xdtype).eval(), fullgraph=True)
            t = time.perf_counter()
            y = f(x).float()
            print(f"{kind}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
            ref = y if ref is None else ref
            print(f"  max |y - y_{args.variants.split(',')[0]}| = {(y - ref).abs().max().item():.2e}")
            fns[kind] = f
        times = {k: [] for k in fns}
        for r in range(args.rounds):
            for kind, f in fns.items():
                f(x)
                t = time.perf_counter()
                for _ in range(args.iters):
                    f(x)
                times[kind].append((time.perf_counter() - t) / args.iters * 1e3)
            print(f"round {r}: load {os.getloadavg()[0]:.2f}  " +
                  "  ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()), flush=True)
    print(f"\n{args.dtype} weights, x {xdtype}, {args.threads} thread(s), {nbytes / 1e6:.0f} MB, "
          f"median of {args.rounds} rounds x {args.iters} calls, ms per call (GB/s):")
    base = statistics.median(times[next(iter(times))])
    for kind, v in times.items():
        m = statistics.median(v)
        print(f"  {kind:8s} {m:6.2f} ms  {nbytes / m / 1e6:5.1f} GB/s  x{base / m:.2f} vs first  (min {min(v):.2f})")


if __name__ == "__main__":
    main()
