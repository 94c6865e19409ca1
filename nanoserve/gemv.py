"""A Triton linear layer for decode on CUDA: y = x @ W.T + b when x has only a few rows.

A decode step of one sequence multiplies one row of activations by every weight matrix of the
model: GPT-2 XL reads its 3.1 GB of fp16 weights once per token and does two flops per weight
it reads. Such a step is bound by memory bandwidth, not arithmetic, so the best kernel is the
one that streams W at the highest rate. cuBLAS picks tile shapes made for larger M and splits
K across programs (then adds a reduction kernel): on an H200, XL's 193 decode GEMMs (M = 1, in
one CUDA graph) took 1.63 ms with F.linear (1.9 TB/s), and a 20-line Triton GEMV 1.42 ms (2.2
TB/s) with two output rows per program and 1024-wide K tiles; a device-to-device copy runs at
4.3 TB/s (docs/bench/2026-11-30-h200-fused/gemv.log). So for small M we use our own kernel:

  _gemv_kernel   one program per BLOCK_N output features. It streams their rows of W in
                 (BLOCK_N, BLOCK_K) tiles and multiplies each tile, once in registers, by all M
                 input rows: W is read from memory once however many rows x has. Products are
                 summed elementwise in fp32 and reduced across K once, at the end, so the loop
                 has no cross-thread reduction in it. The bias, and for the MLP's c_fc the
                 GELU, are applied to the fp32 sums before the one rounding to x's dtype.

For more rows (M > MAX_M, i.e. prefill and larger decode batches) cuBLAS's tiled GEMMs win.
Measured on an H200 (docs/bench/2026-11-30-h200-async/gemv_bench.py, a whole decode step's
linears in one CUDA graph, ms, cuBLAS against this kernel):
    GPT-2 XL:   M=1 1.61 vs 1.30   M=2 1.61 vs 1.50   M=4 1.64 vs 2.38   M=8 1.58 vs 3.26
    GPT-2 124M: M=1 0.27 vs 0.18   M=2 0.28 vs 0.22   M=4 0.30 vs 0.32   M=8 0.30 vs 0.38
With M rows the kernel holds M times the accumulators and falls off past two rows, so MAX_M = 2.

The engine plugs the kernel in the way linear.py plugs in the CPU linears: every Conv1D becomes
a GemvLinear (same name, same weight tensors, no copy) and model.fast_head reads the lm_head
through it (use_gemv_linears). GemvLinear falls back to F.linear for large M and for tensors
off CUDA. Inside fused.py's torch.compile'd decode step it is a custom op (`nanoserve::gemv`),
opaque to Inductor; the op decides between the kernel and F.linear when it runs, so one compiled
graph serves every batch size.

M = rows of x (tokens)   K = in features   N = out features   BM = M padded to a power of 2

References: Triton's matmul tutorial; Williams et al., "Roofline" (2009) for why bandwidth
bounds a GEMV; FasterTransformer's batched decode GEMV (one W pass for several rows).
"""
# Annotations stay strings, so `tl.constexpr` is not evaluated at import (see kernels.py).
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import HAS_TRITON, _jit, tl, triton

# The kernel serves 1 <= M <= MAX_M rows; larger M goes to cuBLAS (F.linear). Measured: above.
MAX_M = 2

# Tile shapes (BLOCK_N, BLOCK_K, num_warps) that docs/bench/2026-11-30-h200-async/gemv_bench.py times against cuBLAS.
# pick_config uses one of them for each M up to MAX_M; the others are there to be measured.
CONFIGS = [(1, 1024, 4), (2, 256, 4), (2, 512, 4), (2, 1024, 4), (4, 256, 4), (4, 512, 4),
           (8, 256, 4), (8, 512, 4), (2, 2048, 8), (4, 1024, 8)]
# fp32 accumulators per thread the deferred reduction may hold: BM * BLOCK_N * BLOCK_K / threads.
# The two fastest tiles at M = 1 in gemv.log (2 x 1024 and 4 x 512, 4 warps) hold 16; we allow
# twice that for several rows (72 registers per thread for sm_90, no spills).
MAX_ACC_PER_THREAD = 32


@_jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # Program p computes y[:, p*BLOCK_N : (p+1)*BLOCK_N] for all M rows of x.
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)                                  # (BM,) rows of x and y
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                  # (BLOCK_N,) output features
    kk = tl.arange(0, BLOCK_K)                                 # (BLOCK_K,)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K               # (BLOCK_N, 1) int64: N*K may pass 2**31
    x_rows = x_ptr + m[:, None] * stride_xm                    # (BM, 1)
    # Elementwise fp32 sums of x[m, k] * W[n, k], reduced over k after the loop. One row (the
    # decode step of one sequence) keeps a 2D accumulator, the layout of the kernel measured in
    # gemv.log; several rows add a leading row axis.
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        w_mask = (n[:, None] < N) & (k[None, :] < K)                                               # (BLOCK_N, BLOCK_K)
        if BLOCK_M == 1:
            w = tl.load(w_rows + k[None, :], mask=w_mask, other=0.0)                               # (BLOCK_N, BLOCK_K)
            x = tl.load(x_ptr + k[None, :], mask=k[None, :] < K, other=0.0)                        # (1, BLOCK_K)
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            # Both tiles are loaded as 3D, so they arrive in the accumulator's layout (which
            # thread holds which elements). A 2D W tile broadcast to 3D after loading made the
            # compiler move it through shared memory every iteration (its TTGIR for sm_90 showed
            # a convert_layout in the loop); loaded as 3D, the loop has none.
            w = tl.load((w_rows + k[None, :])[None, :, :], mask=w_mask[None, :, :], other=0.0)     # (1, BLOCK_N, BLOCK_K)
            x = tl.load(x_rows[:, :, None] + k[None, None, :],
                        mask=(m[:, None, None] < M) & (k[None, None, :] < K), other=0.0)           # (BM, 1, BLOCK_K)
            acc += x.to(tl.float32) * w.to(tl.float32)                                             # (BM, BLOCK_N, BLOCK_K)
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]                       # (1, BLOCK_N)
    else:
        y = tl.sum(acc, axis=2)                                # (BM, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        # GPT-2's gelu_new, 0.5 y (1 + tanh(u)) with u = sqrt(2/pi) (y + 0.044715 y^3), written
        # as y * sigmoid(2u) (the same function; tl has sigmoid). Applied to the fp32 sum here,
        # it saves the decode step a kernel per layer that would read y back and write it again.
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def pick_config(M: int) -> tuple[int, int, int]:
    """The tile shape for M rows: (BLOCK_N, BLOCK_K, num_warps).

    From gemv.log (XL, M = 1, one H200): two output rows per program, 1024-wide K tiles and 4
    warps streamed W fastest (2.2 TB/s; 4 x 512 was within 2%). For more rows we keep 2 x K
    tiles on 4 warps and narrow K so that the accumulators stay within MAX_ACC_PER_THREAD
    (BM * 2 * BLOCK_K <= 32 * 128): 1024 for M <= 2, 512 for 3-4, 256 for 5-8.

    Compiled for sm_90 (docs/bench/2026-11-30-h200-async/gemv_sm90_check.py) these use 40-72
    registers per thread and never spill. A fp16 tile 1024 wide on 4 warps gives each thread 8 contiguous elements of
    every row, in W's tile and x's alike, so the loop moves nothing between threads; narrower
    tiles (M >= 3) make the compiler route one of the two tiles through shared memory each
    iteration. We took that over the alternatives without having measured either: 1 x 1024
    tiles re-read x from L1 once per output row (8x W's bytes at M = 8), wider ones pass 100
    registers. Measured (gemv_bench.py), the kernel beats cuBLAS at M = 1 and 2 only: MAX_M.

    N and K do not enter the rule: gemv.log timed whole decode steps, not shapes. Every GPT-2
    size has N and K in the thousands (hundreds of programs, K a multiple of 16), and
    gemv_bench's per-shape table will show whether one shape wants another tile.
    """
    BM = triton.next_power_of_2(M)
    BLOCK_N, num_warps = 2, 4
    BLOCK_K = min(1024, MAX_ACC_PER_THREAD * 32 * num_warps // (BM * BLOCK_N))
    return BLOCK_N, BLOCK_K, num_warps


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, gelu: bool = False) -> torch.Tensor:
    """y = x @ weight.T + bias with the Triton kernel, for any M (MAX_M is linear's choice);
    with gelu=True, gelu_tanh(y) (GPT-2's "gelu_new"), computed before the rounding to x's dtype.

    Args:
        x: (M, K) activations, any float dtype Triton loads (fp32, fp16, bf16).
        weight: (N, K) row-major, x's dtype.   bias: (N,) or None.
        config: (BLOCK_N, BLOCK_K, num_warps); None: pick_config(M).
    Returns:
        (M, N) in x's dtype, accumulated in fp32.
    """
    if not HAS_TRITON:
        raise RuntimeError("nanoserve.gemv needs triton; pip install triton, or use F.linear")
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K) and weight.stride() == (K, 1), f"weight {tuple(weight.shape)} must be a contiguous (N, {K})"
    assert bias is None or bias.shape == (N,), f"bias must be ({N},)"
    assert weight.dtype == x.dtype, f"x is {x.dtype} but weight is {weight.dtype}"
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)                     # (M, N)
    if M == 0:
        return y
    BLOCK_N, BLOCK_K, num_warps = config or pick_config(M)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
        x, weight, weight if bias is None else bias, y,    # without bias, b_ptr is never read
        M, N, K, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GELU=gelu, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=num_warps)
    return y


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether linear() runs the kernel for x (M, K): on CUDA, for 1 <= M <= MAX_M."""
    return x.is_cuda and HAS_TRITON and 1 <= x.shape[0] <= MAX_M


@torch.library.custom_op("nanoserve::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """linear() as an op for torch.compile: (M, K) -> (M, N), a new tensor. The choice
    between the kernel and cuBLAS is made here, at run time, so the compiled graph holds no
    guard on M (its batch dimension stays dynamic)."""
    return _linear(x, weight, bias, gelu)


@gemv_op.register_fake
def _(x, weight, bias, gelu=False):
    return x.new_empty((x.shape[0], weight.shape[0]))          # (M, N), what Inductor plans with


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    if uses_kernel(x):
        return gemv(x, weight, bias, gelu=gelu)
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu else y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor:
    """F.linear (then gelu_tanh, if asked), with the kernel where it is faster: (M, K) -> (M, N)."""
    if torch.compiler.is_compiling():
        return gemv_op(x, weight, bias, gelu)
    # Eagerly we skip the op's dispatch (some microseconds a call): prefill runs 49 of these
    # per step for GPT-2, and each would pay it.
    return _linear(x, weight, bias, gelu)


class GemvLinear(nn.Module):
    """y = x @ W.T + b through linear(): the kernel for decode, cuBLAS otherwise. With
    gelu=True it returns gelu_tanh(y): the MLP's activation, fused into the kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> None:   # (N, K), (N,)
        super().__init__()
        # A Conv1D's Parameters stay Parameters under the same names (h.0.attn.c_attn.weight);
        # the head, a view of wte, stays a plain tensor. Nothing is copied.
        self.weight, self.bias, self.gelu = weight, bias, gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (M, K) -> (M, N)
        return linear(x, self.weight, self.bias, self.gelu)


@torch.no_grad()
def use_gemv_linears(model: nn.Module) -> None:
    """Replace every Conv1D of `model` (a GPT2 on CUDA in its final dtype) by a GemvLinear over
    the same tensors, and set model.fast_head to one over the head's first num_logits rows. In place."""
    from .model import MLP, Conv1D
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, GemvLinear(mod.weight, mod.bias))
    for mlp in model.modules():
        if isinstance(mlp, MLP) and mlp.approximate == "tanh":
            # The MLP's GELU moves into c_fc's kernel (one launch less per layer and step).
            mlp.c_fc.gelu, mlp.fc_applies_gelu = True, True
    model.fast_head = GemvLinear(model.head_weight(), None)     # the head, padded if pad_head ran
