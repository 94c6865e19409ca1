"""In-process A/B: cpu_gemv's kernel with one stream per thread (nanoserve/cpu_gemv.cpp as of
commit 8fbdb2e, before 1175517, taken from git history and built as torch.ops.nanoserve_cpu1s)
against the two-stream kernel
in nanoserve (torch.ops.nanoserve_cpu), on gemv_bench.py's 12 layers + head, alternating,
median of 9 rounds. (When the run in two_streams.txt was taken, "base" was the one-stream
kernel in nanoserve and "2s" the two-stream one as a side file; the labels below follow that.)

    THR=2 PYTHONPATH=$PWD python docs/bench/2026-11-30-cpu-gemv/two_streams.py    (in a git checkout)
"""
import os, subprocess, sys, tempfile, time, statistics, torch
from pathlib import Path
from nanoserve import cpu_gemv
from nanoserve.linear import quantize_per_channel
from torch.utils.cpp_extension import load
assert cpu_gemv.is_available()
one_stream = subprocess.run(["git", "show", "8fbdb2e:nanoserve/cpu_gemv.cpp"], check=True, capture_output=True, text=True).stdout
src = Path(tempfile.mkdtemp()) / "cpu_gemv_one_stream.cpp"
src.write_text(one_stream.replace("TORCH_LIBRARY(nanoserve_cpu,", "TORCH_LIBRARY(nanoserve_cpu1s,")
               .replace("TORCH_LIBRARY_IMPL(nanoserve_cpu,", "TORCH_LIBRARY_IMPL(nanoserve_cpu1s,"))
load(name="gemv_one_stream", sources=[str(src)], extra_cflags=cpu_gemv._CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
sys.path.insert(0, "docs/bench/2026-11-30-cpu-gemv"); import gemv_bench as gb
torch.set_num_threads(int(os.environ.get("THR", "2")))
mats = gb.weights(); xs = {k: torch.randn(1, k) for k in (768, 3072)}
ops = {"base": torch.ops.nanoserve_cpu1s, "2s": torch.ops.nanoserve_cpu}
runs = {}
for dt in ["float32", "bfloat16", "int8"]:
    xd = torch.bfloat16 if dt == "bfloat16" else torch.float32
    ps = []
    for w, b in mats:
        if dt == "int8":
            q, s = quantize_per_channel(w); ps.append((cpu_gemv.pack(q), w.shape[0], b, s, cpu_gemv.int8_row_sums(q), w.shape[1]))
        else:
            ps.append((cpu_gemv.pack(w.to(xd)), w.shape[0], b, None, None, w.shape[1]))
    for v, ns in ops.items():
        def f(ps=ps, ns=ns, dt=dt, xd=xd):
            for wp, O, b, s, rs, K in ps:
                x = xs[K].to(xd) if xd != torch.float32 else xs[K]
                if dt == "int8": ns.gemv_int8(x, wp, O, s, rs, b)
                elif dt == "bfloat16": ns.gemv_bf16(x, wp, O, b)
                else: ns.gemv_fp32(x, wp, O, b)
        runs[f"{dt} {v}"] = f
for f in runs.values(): f()
T = {n: [] for n in runs}
for r in range(9):
    for n, f in runs.items():
        t = time.perf_counter(); f(); T[n].append((time.perf_counter() - t) * 1e3)
print("threads", os.environ.get("THR", "2"), "load", open("/proc/loadavg").read().split()[0])
for n in runs: print(f"{n:16s} {statistics.median(T[n]):6.2f} ms (min {min(T[n]):.2f})")
