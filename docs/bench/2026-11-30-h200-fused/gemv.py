"""GPT-2 XL's decode GEMMs (M = 1, fp16, 48 layers x 4 + lm_head) in one CUDA graph:
cuBLAS (F.linear) against a plain Triton GEMV, to see whether a hand GEMV could beat 1.5 ms."""
import torch, triton, triton.language as tl, torch.nn.functional as F

@triton.jit
def gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1) + tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(tl.float16), mask=n < N)

def tri(x, w, b, cfg):
    N, K = w.shape
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    BN, BK, nw = cfg
    gemv[(triton.cdiv(N, BN),)](x, w, b, y, N, K, BLOCK_N=BN, BLOCK_K=BK, num_warps=nw)
    return y

C, L, V = 1600, 48, 50257
shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]
torch.manual_seed(0)
Ws = [[(torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02, torch.randn(n, device="cuda", dtype=torch.float16)) for n, k in shapes] for _ in range(L)]
head = torch.randn(V, C, device="cuda", dtype=torch.float16) * 0.02
hb = torch.zeros(V, device="cuda", dtype=torch.float16)
xs = {k: torch.randn(1, k, device="cuda", dtype=torch.float16) for k in (C, 4 * C)}
gb = sum(w.numel() * 2 for l in Ws for w, _ in l) / 1e9 + head.numel() * 2 / 1e9

def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(reps):
        s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]

def cublas():
    for l in Ws:
        for (w, b) in l:
            F.linear(xs[w.shape[1]], w, b)
    F.linear(xs[C], head, hb)
print(f"weights {gb:.2f} GB")
t = timed(cublas); print(f"cuBLAS F.linear: {t:.3f} ms  {gb / t:.2f} TB/s")
# check correctness of the Triton GEMV once
w, b = Ws[0][3]
ref = F.linear(xs[4 * C], w, b).float()
for cfg in [(4, 256, 4), (8, 256, 4), (8, 512, 4), (16, 256, 8), (16, 512, 8), (4, 512, 4), (2, 1024, 4), (32, 128, 4)]:
    got = tri(xs[4 * C], w, b, cfg).float()
    err = ((got - ref).norm() / ref.norm()).item()
    def run(cfg=cfg):
        for l in Ws:
            for (w, b) in l:
                tri(xs[w.shape[1]], w, b, cfg)
        tri(xs[C], head, hb, cfg)
    t = timed(run); print(f"triton gemv BLOCK_N={cfg[0]} BLOCK_K={cfg[1]} warps={cfg[2]}: {t:.3f} ms  {gb / t:.2f} TB/s  rel err {err:.1e}")
