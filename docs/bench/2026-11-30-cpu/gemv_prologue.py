"""Issue 12: what the layer norm recomputed inside every GEMV row costs (fp32, M = 1).

In the compiled decode step Inductor inlines the pointwise part of each linear's input (the
layer norm's (x - mean) * rstd * g + b, the residual adds) into the GEMV's loop, so it runs
again for every output row. Here 12 layers of GPT-2 124M linears, each fed by a layer norm, with
linear.gemv as is ("inline") and with the layer norm's output first copied out through an
opaque custom op ("realized": one 768- or 3072-float buffer per linear, plus the op's call).

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/bench/2026-11-30-cpu/gemv_prologue.py [threads]
"""
import os, statistics, sys, time
import torch
import torch.nn.functional as F
from nanoserve.linear import gemv


@torch.library.custom_op("bench::realize", mutates_args=())
def realize(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@realize.register_fake
def _(x):
    return torch.empty_like(x)


class Net(torch.nn.Module):
    def __init__(self, layers, realized):
        super().__init__()
        self.layers, self.realized = layers, realized

    def lin(self, h, w, b):
        return gemv(realize(h) if self.realized else h, w, b)

    def forward(self, x):                       # (1, 768)
        for (wq, bq), (wo, bo), (wf, bf), (wp, bp) in self.layers:
            a = self.lin(F.layer_norm(x, (768,)), wq, bq)[:, :768]
            x = x + self.lin(a, wo, bo)
            m = F.gelu(self.lin(F.layer_norm(x, (768,)), wf, bf), approximate="tanh")
            x = x + self.lin(m, wp, bp)
        return x


threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
torch.manual_seed(0)
shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
layers = [[(torch.randn(o, k) * 0.02, torch.randn(o) * 0.02) for o, k in shapes] for _ in range(12)]
x = torch.randn(1, 768)
fns = {}
with torch.no_grad(), torch._inductor.config.patch(freezing=True):
    for name, realized in (("inline", False), ("realized", True)):
        torch.compiler.reset()
        fns[name] = torch.compile(Net(layers, realized).eval(), fullgraph=True)
        fns[name](x)
    print("max |inline - realized|", (fns["inline"](x) - fns["realized"](x)).abs().max().item())
    times = {k: [] for k in fns}
    for r in range(9):
        for k, f in fns.items():
            f(x)
            t = time.perf_counter()
            for _ in range(10):
                f(x)
            times[k].append((time.perf_counter() - t) * 100)
        print(f"round {r}: load {os.getloadavg()[0]:.2f}  " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
print(f"{threads} thread(s), 12 layers (340 MB), ms per call, median of 9: " +
      "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
