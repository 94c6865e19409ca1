"""Decode GEMMs of GPT-2 XL and GPT-2 124M at M = 1..16 rows, fp16, one H200: cuBLAS (F.linear)
against nanoserve.gemv's kernel, for each tile in gemv.CONFIGS and for pick_config's choice.

Run from the repository root on the GPU machine (about 1-2 minutes):
    PYTHONPATH=. python docs/bench/2026-11-30-h200-async/gemv_bench.py            # OUT=dir also writes dir/gemv_bench.json

Part 1 (per shape): each projection (c_attn, attn.c_proj, c_fc, mlp.c_proj, lm_head) timed alone
in one CUDA graph over enough distinct weight copies (>= 256 MB, the model's layer count at
least) that L2 (50 MB) holds none of them between launches; us per launch, GB/s, relative error
(norm of the difference / norm of an fp32 reference).
Part 2 (per step): all L x 4 projections and the lm_head in layer order in one CUDA graph, as a
decode step runs them: cuBLAS, gemv.linear (what the engine runs: kernel up to MAX_M, cuBLAS
above), the kernel with pick_config's tile at every M, and the kernel with part 1's best tile
for each shape. Median of 20 replays, CUDA events.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

# DRY=1: tiny shapes on the CPU under Triton's interpreter, plain wall time (checks the script, not speed).
DRY = os.environ.get("DRY") == "1"
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")     # read when triton.jit defines the kernel
import triton  # noqa: E402

from nanoserve import gemv  # noqa: E402

MODELS = {"gpt2-xl": (48, 1600), "gpt2": (12, 768)}          # L, C
V = 50257
MS = [1, 2, 4, 8, 16]
MIN_BYTES = 256 * 2**20     # per shape in part 1: far more than L2
MAX_ACC = 64                # skip tiles holding more fp32 accumulators per thread (they spill)
REPS = 20
DTYPE = torch.float16
DEVICE = "cpu" if DRY else "cuda"
if DRY:
    MODELS, V, MS, MIN_BYTES, REPS, DTYPE = {"tiny": (2, 16)}, 37, [1, 16], 0, 1, torch.float32


def shapes(L: int, C: int) -> list[tuple[str, int, int, int, bool]]:
    """(name, N, K, launches per decode step, has bias), in a layer's order, lm_head last."""
    return [("c_attn", 3 * C, C, L, True), ("attn.c_proj", C, C, L, True), ("c_fc", 4 * C, C, L, True),
            ("mlp.c_proj", C, 4 * C, L, True), ("lm_head", V, C, 1, False)]


def timed_ms(fn) -> float:
    """Median ms of one replay of a CUDA graph of fn()."""
    if DRY:
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)
    fn()                                    # warm-up: Triton compiles, cuBLAS picks its kernel
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]


def configs_for(M: int) -> list[tuple[int, int, int]]:
    """gemv.CONFIGS that fit the register budget at M rows, and pick_config's tile."""
    BM, rule = triton.next_power_of_2(M), gemv.pick_config(M)
    return [c for c in gemv.CONFIGS if BM * c[0] * c[1] // (32 * c[2]) <= MAX_ACC and c != rule] + [rule]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def name_of(cfg) -> str:
    return "cublas" if cfg is None else f"{cfg[0]}x{cfg[1]}w{cfg[2]}"


def bench_model(model: str, t0: float) -> tuple[list[dict], list[dict]]:
    L, C = MODELS[model]
    torch.manual_seed(0)
    weights = {}                                          # shape name -> [(W, b)] copies
    for name, N, K, count, has_bias in shapes(L, C):
        copies = max(count, math.ceil(MIN_BYTES / (N * K * DTYPE.itemsize)))
        weights[name] = [(torch.randn(N, K, device=DEVICE, dtype=DTYPE) * 0.02,
                          torch.randn(N, device=DEVICE, dtype=DTYPE) * 0.02 if has_bias else None)
                         for _ in range(copies)]
    rows, best = [], {}
    # ---- part 1: per shape ----
    for name, N, K, count, _ in shapes(L, C):
        ws = weights[name]
        gb = N * K * DTYPE.itemsize / 1e9
        for M in MS:
            x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
            w0, b0 = ws[0]
            ref = F.linear(x.float(), w0.float(), None if b0 is None else b0.float())
            rule, these = gemv.pick_config(M), []
            for cfg in [None, *configs_for(M)]:
                if cfg is None:
                    op = lambda w, b: F.linear(x, w, b)                    # noqa: E731
                else:
                    op = lambda w, b, cfg=cfg: gemv.gemv(x, w, b, cfg)     # noqa: E731
                err = rel_err(op(w0, b0), ref)
                us = 1000 * timed_ms(lambda: [op(w, b) for w, b in ws]) / len(ws)
                these.append(dict(model=model, shape=name, N=N, K=K, M=M, config=name_of(cfg), is_rule=cfg == rule,
                                  us=us, gb_s=gb / us * 1e6, rel_err=err, cfg=cfg))
            cub, mine = these[0], these[1:]
            top = min(mine, key=lambda r: r["us"])
            best[name, M] = top.pop("cfg")
            for r in these:
                r.pop("cfg", None)
            ru = next(r for r in mine if r["is_rule"])
            rows += these
            print(f"{model:8} {name:11} N={N:5} K={K:4} M={M:2}  cuBLAS {cub['us']:7.2f} us {cub['gb_s']:5.0f} GB/s  "
                  f"rule {name_of(rule)} {ru['us']:7.2f}  best {top['config']} {top['us']:7.2f} us "
                  f"{top['gb_s']:5.0f} GB/s  x{cub['us'] / top['us']:.2f}  err {top['rel_err']:.1e} "
                  f"(cuBLAS {cub['rel_err']:.1e})  [{time.perf_counter() - t0:.0f}s]", flush=True)
    # ---- part 2: whole decode step, layer order ----
    steps = []
    gb = sum(N * K * DTYPE.itemsize * count for _, N, K, count, _ in shapes(L, C)) / 1e9
    layer_shapes = shapes(L, C)[:4]
    for M in MS:
        xs = {K: torch.randn(M, K, device=DEVICE, dtype=DTYPE) for K in (C, 4 * C)}
        variants = {
            "cublas": lambda name, w, b: F.linear(xs[w.shape[1]], w, b),
            "gemv.linear (engine)": lambda name, w, b: gemv.linear(xs[w.shape[1]], w, b),
            "kernel, pick_config": lambda name, w, b: gemv.gemv(xs[w.shape[1]], w, b),
            "kernel, best per shape": lambda name, w, b: gemv.gemv(xs[w.shape[1]], w, b, best[name, M]),
        }
        res = {}
        for label, op in variants.items():
            def step(op=op):
                for i in range(L):
                    for name, *_ in layer_shapes:
                        op(name, *weights[name][i])
                op("lm_head", *weights["lm_head"][0])
            res[label] = timed_ms(step)
        steps.append(dict(model=model, M=M, weights_gb=gb, ms=res))
        print(f"{model:8} step M={M:2}: " + "  ".join(f"{k} {v:.3f} ms ({gb / v:.2f} TB/s)" for k, v in res.items()),
              flush=True)
    weights.clear()                                       # free the GPU memory for the next model
    if not DRY:
        torch.cuda.empty_cache()
    return rows, steps


def main() -> None:
    t0 = time.perf_counter()
    dev = "cpu (DRY=1)" if DRY else torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, triton {triton.__version__}, MAX_M {gemv.MAX_M}, "
          f"pick_config: " + ", ".join(f"M={m}: {name_of(gemv.pick_config(m))}" for m in MS))
    rows, steps = [], []
    for model in (sys.argv[1:] or list(MODELS)):
        r, s = bench_model(model, t0)
        rows += r
        steps += s
    print(f"done in {time.perf_counter() - t0:.0f} s")
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, "gemv_bench.json")
        with open(path, "w") as f:
            json.dump(dict(device=dev, torch=torch.__version__, triton=triton.__version__, max_m=gemv.MAX_M,
                           configs=gemv.CONFIGS, per_shape=rows, per_step=steps), f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
