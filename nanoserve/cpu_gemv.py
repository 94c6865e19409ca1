"""Hand-written AVX-512 matrix-vector products for decode steps of 1-8 tokens on the CPU.

When one sequence decodes, each linear layer multiplies one row of activations by its whole
weight matrix: every weight is read once and used once, so the layer can be no faster than
reading its weights from memory. oneDNN's kernels (linear.py) are built for matrices; at one
row they read the weights more slowly than a plain streaming read does (on this project's
2-core CPU: fp32 at ~4/5 of its rate, bf16 at ~3/4, int8 at ~1/2; BENCHMARKS.md). So for
M = 1 we use our own loop (cpu_gemv.cpp, ~190 lines of C++ with AVX-512 intrinsics) on a
copy of W repacked at load (pack(), below) so that each block of 16 output rows is read as
one front-to-back stream, one 64-byte vector per instruction, 16 outputs per vector; for the
narrow types it uses the CPU's dot-product instructions, vdpbf16ps (bf16 pairs into fp32) and
vpdpbusd (uint8 x int8 quads into int32), as llama.cpp's bf16 and Q8_0 kernels do. For
GPT-2 124M's step that is 1.2-1.5x oneDNN's speed in fp32, 1.3-1.6x in bf16, 2-2.2x in int8,
at about the rate a plain streaming read reaches here (BENCHMARKS.md, issue 12). A decode
step of a few sequences (M up to MAX_ROWS = 8) is still bound by reading the weights, so the
same loop takes M rows: each weight vector, loaded once, feeds M instructions (at M = 8 the 49
products ran 1.1x oneDNN in bf16, 1.8x in fp32, 2.3x in int8; fifth session). The cost is
memory: the packed copy sits beside oneDNN's (which batched steps and prefill still use).

It is built the first time an engine on the CPU needs it, with torch.utils.cpp_extension
(g++ and ninja; 25-40 s cold, then cached under ~/.cache/torch_extensions), and only on
a CPU whose /proc/cpuinfo lists AVX-512 with BF16 and VNNI (Cooper Lake, Sapphire Rapids and
later Xeons, AMD Zen 4 and later). Anywhere else, or if the build fails (one warning), the
linears keep oneDNN. NANOSERVE_CPU_GEMV=0 turns it off, for A/B measurements.

The ops are torch ops (torch.ops.nanoserve_cpu.gemv_fp32 / _bf16 / _int8), so a
torch.compile'd decode step (fused.py) keeps them as opaque calls; the fake kernels below give
Inductor their output shapes. A fourth, write_kv_one, stores one token's K/V in the cache for
that step (the same copies as attention.write_kv, without a trip through Python).

References: llama.cpp ggml-cpu (ggml_vec_dot_bf16, ggml_vec_dot_q8_0_q8_0); Intel's intrinsics
guide for _mm512_dpbf16_ps and _mm512_dpbusd_epi32; Williams et al., "Roofline" (2009).

M = rows of x   K = in features   O = out features
"""
from __future__ import annotations

import mmap
import os
import sys
import warnings
from pathlib import Path

import torch

# The instructions the C++ is compiled for (gcc's names) and the /proc/cpuinfo flags that say
# the CPU has them.
_CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}
_state: dict[str, bool] = {}            # "loaded": the ops exist (True) or cannot (False)
_ext: list = []                         # the built module (cpu_step.py's Decoder lives there)
MAX_ROWS = 8                            # rows of x one call takes (cpu_gemv.cpp's kMaxRows)


def cpu_has_instructions() -> bool:
    """Whether /proc/cpuinfo lists every instruction set the kernels are compiled for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:                     # not Linux: we do not guess
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return _CPU_FLAGS <= set(flags)


def is_available() -> bool:
    """Whether the ops can run here, building them on the first call (once per process)."""
    if "loaded" not in _state:
        _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    if os.environ.get("NANOSERVE_CPU_GEMV", "1") == "0" or not cpu_has_instructions():
        return False
    try:
        _build()
    except Exception as e:              # no compiler, no ninja, ...: oneDNN still works
        warnings.warn(f"nanoserve: building the AVX-512 GEMV (cpu_gemv.cpp) failed, so one-token decode "
                      f"keeps oneDNN's kernels ({type(e).__name__}: {str(e)[:300]})", RuntimeWarning, stacklevel=3)
        return False
    return True


def extension():
    """The built Python module: its Decoder class is cpu_step.cpp's step (cpu_step.py)."""
    assert is_available(), "cpu_gemv did not build here (is_available() is False)"
    return _ext[0]


def _build() -> None:
    """Compile cpu_gemv.cpp and cpu_step.cpp (or load them from torch's extension cache): a
    Python module whose loading also registers the torch ops."""
    if _ext:                                             # already loaded by this process
        return
    from torch.utils.cpp_extension import _get_build_directory, load
    if not (Path(_get_build_directory("nanoserve_cpu_gemv", False)) / "nanoserve_cpu_gemv.so").exists():
        # The first engine on a machine waits for g++: say why (later runs load the cached .so).
        print("nanoserve: compiling the AVX-512 GEMV (cpu_gemv.cpp) once for this machine, ~30 s ...",
              file=sys.stderr, flush=True)
    here = Path(__file__).parent      # cpu_step.cpp: the decode step over these ops (cpu_step.py)
    _ext.append(load(name="nanoserve_cpu_gemv", sources=[str(here / "cpu_gemv.cpp"), str(here / "cpu_step.cpp")],
                     extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False))
    _register_fakes()


def _register_fakes() -> None:
    """Output shapes for torch.compile: (1, K) x W (O, K) -> (1, O) in x's dtype."""
    def fake(x: torch.Tensor, wp: torch.Tensor, out_features: int, *rest: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.shape[0], out_features)
    for name in ("gemv_fp32", "gemv_bf16", "gemv_int8"):
        torch.library.register_fake(f"nanoserve_cpu::{name}", fake)
    torch.library.register_fake("nanoserve_cpu::write_kv_one", lambda k, v, k_cache, v_cache, slot_mapping: None)


def int8_row_sums(q: torch.Tensor) -> torch.Tensor:
    """(O, K) int8 -> (O,) int32: sum_k q[o, k], the correction for the +128 shift of x."""
    return q.sum(dim=1, dtype=torch.int32)


def pack(w: torch.Tensor) -> torch.Tensor:
    """W (O, K) float32, bfloat16 or int8 -> (O/16, K/G, 16, G), zero-padded, for the ops:
    each block of 16 rows becomes one front-to-back stream of 64-byte vectors, each holding the
    16 rows' weights for G consecutive inputs (G = 1, 2, 4 for 4-, 2-, 1-byte weights: what one
    lane of vfmadd, vdpbf16ps, vpdpbusd takes). cpu_gemv.cpp explains why."""
    G = 4 // w.element_size()
    O, K = w.shape
    Op, Kp = -(-O // 16) * 16, -(-K // G) * G                      # padded with zero weights
    wp = torch.zeros(Op, Kp, dtype=w.dtype)
    wp[:O, :K] = w
    packed = huge_pages_empty((Op // 16, Kp // G, 16, G), w.dtype)
    return packed.copy_(wp.view(Op // 16, 16, Kp // G, G).permute(0, 2, 1, 3))   # (O/16, K/G, 16, G)


_HUGE = 2 << 20                         # bytes in one x86 huge page


def huge_pages_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in memory that Linux backs with 2 MiB pages where it can.

    The GEMVs read every weight once per token, front to back. With 4 KiB pages that stream
    crosses a page every 4 KiB: a TLB miss each time, and the hardware prefetcher, which works
    within a page, starts over. madvise(MADV_HUGEPAGE) on an anonymous mapping asks for
    transparent huge pages (honoured when /sys/kernel/mm/transparent_hugepage/enabled says
    "always" or "madvise", the usual defaults). Measured on this project's 2-core EPYC, the 49
    products of GPT-2 124M: bf16 6.14 -> 4.64 ms, int8 3.54 -> 3.05 ms (BENCHMARKS.md, issue 12,
    fifth session). llama.cpp gets the same from the kernel by mmapping its model file. The
    tensor keeps the mapping alive; below 2 MiB, or without madvise, it is torch.empty."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < _HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    area = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(area, dtype=torch.uint8)            # shares the mapping, and holds it
    start = -raw.data_ptr() % _HUGE                             # the first 2 MiB boundary
    return raw[start:start + nbytes].view(dtype).view(shape)


def gemv(x: torch.Tensor, wp: torch.Tensor, out_features: int, bias: torch.Tensor | None,
         scale: torch.Tensor | None = None, row_sums: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W.T + bias -> (M, O) for M <= MAX_ROWS, W given as pack(W) and O = out_features, by W's dtype:
    float32, bfloat16, or int8 with its per-row scale (O,) float32 and row_sums (O,) int32.
    bias is float32 or None. The result has x's dtype."""
    if wp.dtype == torch.int8:
        return torch.ops.nanoserve_cpu.gemv_int8(x, wp, out_features, scale, row_sums, bias)
    if wp.dtype == torch.bfloat16:
        return torch.ops.nanoserve_cpu.gemv_bf16(x, wp, out_features, bias)
    return torch.ops.nanoserve_cpu.gemv_fp32(x, wp, out_features, bias)
