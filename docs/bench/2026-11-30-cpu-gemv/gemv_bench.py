"""Issue 12, third session: one GPT-2 124M decode step's linears at M = 1, kernel against kernel.

12 layers of distinct weights (768->2304, 768->768, 768->3072, 3072->768: 48 products, 85M
weights, so nothing stays in the 32 MiB L3) plus the 50257 x 768 head, each called on one
token row. Per weight dtype, timed alternately in one process (median of the rounds, ms per
step's set of products, and the weight bytes read per second):

  ours     cpu_gemv's AVX-512 op (nanoserve/cpu_gemv.cpp) on its packed (O/16, K/G, 16, G) weights
  onednn   linear.PackedLinear / Int8Linear: oneDNN's packed kernels (the eager engine before)
  inductor linear.gemv compiled with freezing (fp32 and bf16): the compiled step's loop before
  sum      eager torch.sum over the same fp32 weights, per matrix: how fast 2 threads read
           memory here (a streaming roofline; ATen's sum is vectorized with several accumulators)

Usage: PYTHONPATH=$PWD python docs/bench/2026-11-30-cpu-gemv/gemv_bench.py --threads 2 --rounds 9
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nanoserve import cpu_gemv
from nanoserve.linear import Int8Linear, PackedLinear, gemv, quantize_per_channel

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]   # (O, K) per layer


def weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mats = [(torch.randn(o, k, generator=g) * 0.02, torch.randn(o, generator=g) * 0.02) for _ in range(12) for o, k in SHAPES]
    mats.append((torch.randn(50257, 768, generator=g) * 0.02, None))
    return mats


def make(kind: str, dtype: str, mats):
    """A list of (callable, K) for the step's 49 products."""
    out = []
    for w, b in mats:
        if dtype == "int8":
            if kind == "onednn":
                f = Int8Linear(w, b)
            else:
                q, s = quantize_per_channel(w)
                qp, rs = cpu_gemv.pack(q), cpu_gemv.int8_row_sums(q)
                f = (lambda qp, O, s, rs, b: lambda x: cpu_gemv.gemv(x, qp, O, b, s, rs))(qp, q.shape[0], s, rs, b)
        else:
            wd = w.to(getattr(torch, dtype)).contiguous()
            if kind == "onednn":
                f = PackedLinear(wd, None if b is None else b.to(wd.dtype))
            elif kind == "ours":
                f = (lambda wp, O, b: lambda x: cpu_gemv.gemv(x, wp, O, b))(cpu_gemv.pack(wd), wd.shape[0], b)
            else:   # inductor
                bd = None if b is None else b.to(wd.dtype)
                f = torch.compile((lambda wd, bd: lambda x: gemv(x, wd, bd))(wd, bd), fullgraph=True)
        if kind == "onednn":
            f.gemv_weight = None        # the modules would run cpu_gemv for one row now
        out.append((f, w.shape[1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_gemv.is_available()
    mats = weights()
    xs = {k: torch.randn(1, k) for k in (768, 3072)}
    runs = {}
    for dt in args.dtypes.split(","):
        kinds = ["ours", "onednn"] + (["inductor"] if dt != "int8" else [])
        xdt = torch.bfloat16 if dt == "bfloat16" else torch.float32
        for kind in kinds:
            fs = make(kind, dt, mats)
            nbytes = sum(w.numel() for w, _ in mats) * {"float32": 4, "bfloat16": 2, "int8": 1}[dt]
            runs[f"{dt} {kind}"] = (fs, {k: v.to(xdt) for k, v in xs.items()}, nbytes)
    flat = [w for w, _ in mats]
    runs["fp32 sum"] = ([((lambda w: lambda x: w.sum())(w), 768) for w in flat], {768: xs[768]}, sum(w.numel() for w in flat) * 4)
    with torch.inference_mode():
        with torch._inductor.config.patch(freezing=True):
            for fs, x, _ in runs.values():            # warm up (and compile)
                for f, k in fs:
                    f(x[k] if k in x else x[768])
        times = {n: [] for n in runs}
        for r in range(args.rounds):
            for name, (fs, x, _) in runs.items():
                t = time.perf_counter()
                for _ in range(3):
                    for f, k in fs:
                        f(x[k] if k in x else x[768])
                times[name].append((time.perf_counter() - t) / 3 * 1e3)
    load = os.getloadavg()[0]
    print(f"threads={args.threads} rounds={args.rounds} load1(end)={load:.2f}")
    for name, (_, _, nbytes) in runs.items():
        ms = statistics.median(times[name])
        print(f"{name:18s} {ms:7.2f} ms  (min {min(times[name]):6.2f})  {nbytes / ms / 1e6:5.1f} GB/s  [{nbytes / 1e6:.0f} MB]")


if __name__ == "__main__":
    main()
