import time, statistics, collections, torch, sys
from pathlib import Path
from torch.utils.cpp_extension import load
mod = load(name="pyb_test_ext", sources=["docs/bench/2026-11-30-cpu-host/call_cost_ext.cpp"], is_python_module=True, verbose=False)
a = torch.classes.pyb_test.A(); b = mod.B()
kv = torch.zeros(10)
args = ([5], [99], [99], [100], [list(range(7))], kv, True)
big = torch.randn(60_000_000)   # 240 MB to flush
acc = collections.defaultdict(list)
for i in range(40):
    for name, f in (("custom class", a.step), ("pybind11", b.step)):
        big.sum()
        t = time.perf_counter(); f(*args); t1 = time.perf_counter(); f(*args); t2 = time.perf_counter()
        acc[name + " cold"].append(t1 - t); acc[name + " warm"].append(t2 - t1)
for k, v in acc.items(): print(f"{k:24s} {statistics.median(v)*1e6:.1f} us")
