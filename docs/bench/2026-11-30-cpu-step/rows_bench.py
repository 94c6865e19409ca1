"""The 49 products of GPT-2 124M at M = 1, 2, 4, 8 rows: cpu_gemv (M rows per call) against oneDNN
(PackedLinear / Int8Linear without gemv). PYTHONPATH=$PWD python rows_bench.py bfloat16|int8|float32"""
import sys, time, statistics, torch
from nanoserve import cpu_gemv
from nanoserve.linear import PackedLinear, Int8Linear
torch.set_num_threads(2)
assert cpu_gemv.is_available()
dt = sys.argv[1]
shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
mods = []
for O, K in shapes:
    w = torch.randn(O, K) * 0.05
    b = torch.randn(O) if O != 50257 else None
    mods.append(Int8Linear(w, b) if dt == "int8" else PackedLinear(w.to(torch.bfloat16 if dt == "bfloat16" else torch.float32), None if b is None else b.to(torch.bfloat16 if dt == "bfloat16" else torch.float32)))
xdt = torch.bfloat16 if dt == "bfloat16" else torch.float32
def run(M, use_gemv):
    xs = {768: torch.randn(M, 768).to(xdt), 3072: torch.randn(M, 3072).to(xdt)}
    t = time.perf_counter()
    for mod in mods:
        x = xs[mod.gemv_weight.shape[1] * (4 // mod.gemv_weight.element_size())]
        if use_gemv:
            if dt == "int8": cpu_gemv.gemv(x, mod.gemv_weight, mod.out_features, mod.gemv_bias, mod.w_scale, mod.row_sums)
            else: cpu_gemv.gemv(x, mod.gemv_weight, mod.out_features, mod.gemv_bias)
        else:
            if dt == "int8":
                g = mod.gemv_weight; mod.gemv_weight = None; mod(x); mod.gemv_weight = g
            else:
                torch.ops.mkldnn._linear_pointwise(x, mod.packed, mod.bias, "none", [], "")
    return (time.perf_counter() - t) * 1e3
with torch.inference_mode():
    for M in (1, 2, 4, 8):
        for _ in range(2): run(M, True); run(M, False)
        g = statistics.median(run(M, True) for _ in range(7)); o = statistics.median(run(M, False) for _ in range(7))
        print(f"{dt} M={M}: gemv {g:7.2f} ms   oneDNN {o:7.2f} ms   ({o/g:.2f}x)")
