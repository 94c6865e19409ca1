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
    mods.append(Int8Linear(w, torch.randn(O)) if dt == "int8" else PackedLinear(w.bfloat16(), torch.randn(O).bfloat16()))
xdt = torch.float32 if dt == "int8" else torch.bfloat16
def run(M, chunk):
    xs = {768: torch.randn(M, 768).to(xdt), 3072: torch.randn(M, 3072).to(xdt)}
    t = time.perf_counter()
    for mod in mods:
        x = xs[mod.gemv_weight.shape[1] * (4 // mod.gemv_weight.element_size())]
        if chunk:
            for i in range(0, M, 8):
                mod(x[i:i + 8])
        else:
            g = mod.gemv_weight; mod.gemv_weight = None; mod(x); mod.gemv_weight = g
    return (time.perf_counter() - t) * 1e3
with torch.inference_mode():
    for M in (16, 32):
        for _ in range(2): run(M, True); run(M, False)
        c = statistics.median(run(M, True) for _ in range(5)); o = statistics.median(run(M, False) for _ in range(5))
        print(f"{dt} M={M}: 8-row chunks {c:7.2f} ms   oneDNN {o:7.2f} ms")
