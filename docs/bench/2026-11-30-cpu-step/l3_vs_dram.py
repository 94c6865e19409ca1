"""bf16 GEMVs in a loop over working sets that fit this CPU's 32 MiB L3 and ones that do not.
PYTHONPATH=$PWD python docs/bench/2026-11-30-cpu-step/l3_vs_dram.py"""
import time, torch
from nanoserve import cpu_gemv
torch.set_num_threads(2)
cpu_gemv.is_available()
def bench(O, K, n, dtype=torch.bfloat16, reps=200):
    ws = [cpu_gemv.pack(torch.randn(O, K).to(dtype)) for _ in range(n)]
    x = torch.randn(1, K)
    for w in ws: cpu_gemv.gemv(x, w, O, None)
    t = time.perf_counter()
    for _ in range(reps):
        for w in ws: cpu_gemv.gemv(x, w, O, None)
    dt = (time.perf_counter() - t) / reps
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    print(f"{n:3d} x ({O}x{K}) {nbytes/2**20:7.1f} MiB: {dt*1e3:7.3f} ms  {nbytes/dt/1e9:6.1f} GB/s  ({dt/n*1e6:.1f} us/call)")
for n in (4, 8, 12, 24, 48):
    bench(768, 768, n)
bench(3072, 768, 12, reps=50)
bench(3072, 768, 48, reps=20)
