"""One process, two copies of GPT-2 124M's packed weights (49 products): ordinary pages vs
transparent huge pages (an anonymous mmap, madvise(MADV_HUGEPAGE), 2 MiB-aligned), alternating
passes over all 49 products. python thp_one.py bfloat16|int8|float32 rounds"""
import mmap, statistics, sys, time, torch
from nanoserve import cpu_gemv
torch.set_num_threads(2)
assert cpu_gemv.is_available()
dt = {"bfloat16": torch.bfloat16, "int8": torch.int8, "float32": torch.float32}[sys.argv[1]]
shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
keep = []
def huge_copy(t):
    n = t.numel() * t.element_size()
    m = mmap.mmap(-1, n + 2 ** 21, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    off = (-buf.data_ptr()) % 2 ** 21
    out = buf[off:off + n].view(t.dtype).view(t.shape)
    out.copy_(t)
    keep.append((m, buf))
    return out
def make(O, K):
    w = torch.randn(O, K)
    if dt == torch.int8:
        q = (w * 40).round().clamp(-127, 127).to(torch.int8)
        return cpu_gemv.pack(q), torch.rand(O), cpu_gemv.int8_row_sums(q)
    return cpu_gemv.pack(w.to(dt)), None, None
plain = [(O, K) + make(O, K) for O, K in shapes]
plain = [(O, K, w.clone(), s, r) for O, K, w, s, r in plain]   # ordinary pages
huge = [(O, K, huge_copy(w), s, r) for O, K, w, s, r in plain]
xs = {K: torch.randn(1, K) for K in (768, 3072)}
def run(ws):
    t = time.perf_counter()
    for O, K, w, s, r in ws:
        cpu_gemv.gemv(xs[K], w, O, None, s, r)
    return (time.perf_counter() - t) * 1e3
for _ in range(3): run(plain); run(huge)
res = {"plain": [], "huge": []}
for i in range(int(sys.argv[2])):
    res["plain"].append(run(plain)); res["huge"].append(run(huge))
nbytes = sum(w.numel() * w.element_size() for _, _, w, _, _ in plain)
print("AnonHugePages:", [l.split()[1] for l in open("/proc/self/smaps_rollup") if "AnonHuge" in l][0], "kB")
for k, v in res.items():
    m = statistics.median(v)
    print(f"{sys.argv[1]} {k:5s}: median {m:.3f} ms ({nbytes / m / 1e6:.1f} GB/s), min {min(v):.3f}")
