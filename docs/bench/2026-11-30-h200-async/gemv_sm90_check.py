"""Compile nanoserve.gemv's kernel ahead of time for sm_90 (H100/H200) on a machine without a GPU,
and print per tile: registers per thread, local-memory spills, and layout conversions in the
TTGIR (a convert_layout inside the K loop means a trip through shared memory every iteration).

    PYTHONPATH=. python docs/bench/2026-11-30-h200-async/gemv_sm90_check.py            # every tile gemv_bench.py times
    PYTHONPATH=. python docs/bench/2026-11-30-h200-async/gemv_sm90_check.py 2 2 1024 4 # BM BLOCK_N BLOCK_K warps: print its TTGIR

Uses triton's compiler API (ASTSource, GPUTarget) and the ptxas/cuobjdump shipped in its wheel;
written against triton 3.7.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nanoserve import gemv  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_tile(BM: int, BLOCK_N: int, BLOCK_K: int, num_warps: int, dtype: str = "fp16", bias: bool = True):
    sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "M": "i32",
           "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"HAS_BIAS": bias, "BLOCK_M": BM, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
    # Pointers 16-byte aligned, N, K and strides multiples of 16: GPT-2's layers (not lm_head's N).
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6, 7, 8)}
    src = ASTSource(fn=gemv._gemv_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resources(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return " ".join(w for w in line.split() if w.startswith(("REG:", "LOCAL:")))


def conversions_in_loop(ttgir: str) -> int:
    loop = ttgir[ttgir.index("scf.for"):ttgir.index("scf.yield")]
    return loop.count("convert_layout")


def main() -> None:
    if len(sys.argv) == 5:
        print(compile_tile(*map(int, sys.argv[1:])).asm["ttgir"])
        return
    for M in (1, 2, 4, 8, 16):
        BM = triton.next_power_of_2(M)
        tiles = {c for c in gemv.CONFIGS if BM * c[0] * c[1] // (32 * c[2]) <= 64} | {gemv.pick_config(M)}
        for c in sorted(tiles):
            k = compile_tile(BM, *c)
            rule = "  <- pick_config" if c == gemv.pick_config(M) else ""
            print(f"BM={BM:2} {c[0]}x{c[1]} w{c[2]}: {resources(k)}, "
                  f"convert_layout in loop: {conversions_in_loop(k.asm['ttgir'])}{rule}")


if __name__ == "__main__":
    main()
