"""Linear layers for the CPU: weights prepacked for oneDNN, and int8 weights.

Per decode step GPT-2 124M multiplies its hidden states by 85M parameters in 48 linear
layers and by the 38.6M-parameter lm_head; on a CPU that is almost the whole step. With one
sequence each product is a matrix-vector product: every weight is read once from memory and
used once, so the step can be no faster than streaming the weights (497 MB in fp32). We
measured (2 cores, torch 2.13, GPT-2 124M shapes, batch 1) `F.linear` on plain (out, in)
weights reaching 12-14 GB/s, and the same products with the weights reordered once, at load,
into oneDNN's blocked layout 25-33 GB/s; at 8 and 32 sequences the gap was 3x and 2x
(BENCHMARKS.md has the table). So on a CPU the engine replaces each Conv1D and the lm_head
with one of:

  PackedLinear   float32 or bfloat16 weights, reordered for oneDNN (torch.ops.mkldnn); the
                 same arithmetic as F.linear, to float32 rounding.
  Int8Linear     quantization="int8": per-output-channel symmetric int8 weights, computed at
                 load from any checkpoint (w ~= scale[o] * q[o, i], |q| <= 127). Each token's
                 input row is quantized on the fly, symmetric with its own scale, and the
                 int8 x int8 products run in oneDNN's VNNI kernel (torch.ops.onednn), as
                 CTranslate2's int8 and llama.cpp's Q8_0 do. A quarter of fp32's bytes.

With one to eight tokens (N <= cpu_gemv.MAX_ROWS: decode steps of up to 8 sequences) both
run cpu_gemv.py's hand-written AVX-512 kernels instead, on a second copy of the weights packed
for them, where the CPU has AVX-512 BF16 and VNNI: at one row they read the weights 1.2-2.2x
faster than oneDNN does, at 8 rows 1.1-2.3x (BENCHMARKS.md, issue 12, third and fifth
sessions). Elsewhere, the compiled one-sequence decode step
(fused.compile_cpu_decode) runs gemv() below in float32, an Inductor-generated loop that reads
the plain weights faster than oneDNN reads its packed ones for one row, so it keeps both.

Weight-only int8 (int8 weights, float activations: torch's _weight_int8pack_mm) measured
slower here than bfloat16 weights, and per-tensor dynamic quantization (torch.ao's
quantize_dynamic) would make one request's tokens depend on the others in its batch; hence
per-token scales. On CUDA the model keeps F.linear (cuBLAS streams weights at bandwidth).

References: oneDNN "matmul" and "int8 computations" docs; torch/_inductor/fx_passes/mkldnn_fusion.py
(how Inductor's freezing pass prepacks linear weights); LLM.int8() (Dettmers et al. 2022)
for per-token activation scales; llama.cpp ggml-quants.c (Q8_0).

N = tokens in this step   K = in features   O = out features
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import cpu_gemv

QUANTIZATIONS = (None, "int8")
INT8_GEMV_ROWS = 4 * cpu_gemv.MAX_ROWS    # Int8Linear runs cpu_gemv up to 32 rows (in chunks of 8)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (O, K) float -> q (O, K) int8, scale (O,) float32,
    with w ~= scale[:, None] * q and the largest |w| of each row mapped to 127."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127     # (O,) a zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)   # (O, K)
    return q, scale


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:   # (1, K) -> (1, O)
    """One token times float32 weights (O, K), written elementwise for torch.compile (fused.py).

    Inductor turns it into one C++ loop over the rows of w, each a vectorized dot product; at
    one token that streamed fp32 weights ~1.5x faster than oneDNN's packed kernel. For bf16
    weights the same loop was slower than oneDNN (one accumulator, a conversion per element):
    they keep oneDNN inside the compiled step too (BENCHMARKS.md, issue 12)."""
    y = (w * x).sum(dim=1)                                     # (O,)
    return (y if b is None else y + b)[None]                   # (1, O)


class _FewTokenGemv(nn.Module):
    """Holds W packed for cpu_gemv (a second copy of the weights, made at load) when the CPU
    can run it; `gemv_weight` is None otherwise and the subclass keeps only oneDNN."""

    def _pack_for_gemv(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:   # w (O, K)
        self.out_features = w.shape[0]
        use = cpu_gemv.is_available()
        self.register_buffer("gemv_weight", cpu_gemv.pack(w.detach()) if use else None, persistent=False)
        self.register_buffer("gemv_bias", None if bias is None or not use else bias.detach().float(), persistent=False)


class PackedLinear(_FewTokenGemv):
    """y = x @ W.T + b with W held in oneDNN's blocked layout (an opaque mkldnn tensor), and
    for up to cpu_gemv.MAX_ROWS tokens in cpu_gemv's layout where the CPU runs it.

    keep_weight=True (float32 only) also keeps W as it is, for the compiled batch-1 decode step
    (fused.py), which runs gemv() on it when cpu_gemv is not available: a second copy of the
    weights, except for a tied head, whose W is a view of wte."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_weight: bool = False) -> None:
        super().__init__()                                     # weight (O, K), bias (O,)
        self._pack_for_gemv(weight, bias)
        keep_weight = keep_weight and self.gemv_weight is None
        # No batch-size hint: the layout that then suits every N measured as fast as the one
        # tuned for N = 1 at N = 1, and faster at N = 8 and 32.
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach()), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.register_buffer("weight", weight.detach() if keep_weight else None, persistent=False)   # (O, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (N, K) -> (N, O)
        if self.gemv_weight is not None and x.shape[0] <= cpu_gemv.MAX_ROWS:   # eager and in the compiled step
            return cpu_gemv.gemv(x, self.gemv_weight, self.out_features, self.gemv_bias)
        # Only while torch.compile traces the batch-1 step: eager, the same loop would be slow.
        if self.weight is not None and x.shape[0] == 1 and torch.compiler.is_compiling():
            return gemv(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Int8Linear(_FewTokenGemv):
    """y ~= x @ W.T + b with W as per-channel int8 and x quantized per token (row); for up to
    INT8_GEMV_ROWS tokens through cpu_gemv where the CPU runs it (the same quantization, the
    same result up to float32 rounding)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:   # (O, K), (O,)
        super().__init__()
        q, scale = quantize_per_channel(weight)
        self._pack_for_gemv(q, bias)
        # sum_k q[o, k]: the op shifts x by +128 to uint8 and subtracts 128 * this (cpu_gemv.cpp)
        self.register_buffer("row_sums", cpu_gemv.int8_row_sums(q) if self.gemv_weight is not None else None,
                             persistent=False)
        # oneDNN prepacks the int8 weight for its VNNI kernel (which wants u8 x s8 products,
        # hence the +128 shift of the activations below).
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(q, None), persistent=False)
        self.register_buffer("w_scale", scale, persistent=False)                  # (O,) float32
        self.register_buffer("w_zero", torch.zeros(self.out_features, dtype=torch.long), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        self.register_buffer("half_step", torch.tensor(128.5), persistent=False)   # zero point + rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # (N, K) -> (N, O)
        if self.gemv_weight is not None and x.shape[0] <= INT8_GEMV_ROWS:
            # In chunks of up to 8 rows, each of which reads the weights once: at 32 rows four
            # passes still beat oneDNN's int8 kernel here (the 49 products of GPT-2 124M: 18.8
            # vs 23.0 ms; bf16's chunks lost, 30.8 vs 28.2, so PackedLinear stops at 8).
            return torch.cat([cpu_gemv.gemv(part, self.gemv_weight, self.out_features, self.gemv_bias, self.w_scale,
                                            self.row_sums) for part in x.split(cpu_gemv.MAX_ROWS)])
        # Each row gets its own scale (its largest |x| / 127), so a token's result does not
        # depend on its batch. At one token per step every op here is a fixed cost paid 49
        # times a step (about 3 us each), hence as few ops as we could make them.
        xf = x.float()                                                          # (N, K)
        amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=1, keepdim=True).clamp_min_(1e-12)  # (N, 1)
        # 128.5 + 127 x / amax lies in [1.5, 255.5]; truncating to uint8 rounds to the nearest step.
        xq = torch.addcmul(self.half_step, xf, amax.reciprocal(), value=127).to(torch.uint8)   # (N, K)
        # acc[n, o] = sum_k (xq - 128)[n, k] * q[o, k] * w_scale[o], in int32, then float.
        acc = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, self.packed, self.w_scale, self.w_zero,
                                                 None, 1.0, 0, torch.float32, "none", [None], "")   # (N, O)
        y = acc.mul_(amax / 127) if self.bias is None else torch.addcmul(self.bias, acc, amax, value=1 / 127)
        return y.to(x.dtype)


def is_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PackedLinear serves this device and dtype (oneDNN on a CPU, fp32 or bf16)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


def check_quantization(quantization: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Raise if `quantization` cannot run on this device and dtype."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; use None or 'int8'")
    if quantization is not None and not is_supported(device, dtype):
        raise ValueError(f"quantization={quantization!r} runs on the CPU in float32 or bfloat16 (oneDNN), "
                         f"not on {device.type} in {dtype}; drop quantization or use device='cpu'")


def _make(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None, keep_weight: bool) -> nn.Module:
    return Int8Linear(weight, bias) if quantization == "int8" else PackedLinear(weight, bias, keep_weight)


@torch.no_grad()
def use_cpu_linears(model: nn.Module, quantization: str | None = None, compiled_decode: bool = False) -> None:
    """Replace every Conv1D of `model` (a GPT2 already on the CPU in its final dtype) and its
    output head by PackedLinear or, with quantization="int8", Int8Linear. In place.
    compiled_decode: fused.compile_cpu_decode will run the model too; in float32 without
    cpu_gemv the layers then keep their plain weights for its gemv()s.

    The replaced modules keep their names (h.0.attn.c_attn ...); the float weights they held
    are dropped, except wte, which the embedding lookup still reads."""
    dtype = next(model.parameters()).dtype
    check_quantization(quantization, torch.device("cpu"), dtype)
    keep = compiled_decode and quantization is None and dtype == torch.float32
    from .model import Conv1D
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _make(mod.weight, mod.bias, quantization, keep))
    model.fast_head = _make(model.head_weight(), None, quantization, keep)   # padded ids get no logits
