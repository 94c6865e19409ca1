"""Does prefetchnta on streamed weights keep another set resident in L3? Builds /tmp/nta/nta.cpp
(cpu_gemv.cpp with nta.patch applied). PYTHONPATH=$PWD python docs/bench/2026-11-30-cpu-step/nta_run.py 12"""
import time, torch, sys, statistics
from torch.utils.cpp_extension import load
from nanoserve import cpu_gemv
torch.set_num_threads(2)
load(name="nta_exp", sources=["/tmp/nta/nta.cpp"], extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni"], extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
op = torch.ops.nta_exp.gemv_bf16
A = [cpu_gemv.pack(torch.randn(768, 768).bfloat16()) for _ in range(int(sys.argv[1]))]
B = [cpu_gemv.pack(torch.randn(3072, 768).bfloat16()) for _ in range(48)]
x = torch.randn(1, 768)
def one(dist):
    torch.ops.nta_exp.set_nta(0)
    t0 = time.perf_counter()
    for w in A: op(x, w, 768, None)
    t1 = time.perf_counter()
    torch.ops.nta_exp.set_nta(dist)
    for w in B: op(x, w, 3072, None)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3
res = {}
for r in range(15):
    for d in (0, 1024, 4096, 8192):
        res.setdefault(d, []).append(one(d))
for d, v in res.items():
    a = statistics.median(x[0] for x in v); b = statistics.median(x[1] for x in v)
    print(f"nta dist {d:5d}: A ({len(A)} x 1.1 MiB) {a:.3f} ms, B (216 MiB) {b:.3f} ms, total {a+b:.3f}")
