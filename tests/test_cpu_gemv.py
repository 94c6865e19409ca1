"""cpu_gemv's AVX-512 one-token kernels against the float32 reference.

Tolerances: fp32 is F.linear with the sums reordered (1e-4, as the model tests against HF).
bf16 rounds x and W to bf16 (8 bits of mantissa) and sums in fp32: against F.linear on the same
rounded values it is fp32 rounding (1e-4 relative), against the unrounded fp32 product the
output moves by at most ~1% of its norm (each term by 2^-8 relative, in random directions).
int8 quantizes x per token and W per row, then sums exactly in int32: against F.linear on the
dequantized values it is fp32 rounding (1e-4 relative), against fp32 within 5% of the norm
(1-2.5% measured: the error is larger relative to the output for short rows, K = 33).

Skipped only on a CPU without AVX-512 BF16 and VNNI (CI's CPU has them); if the build fails
there, the tests fail."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoserve import LLM, SamplingParams, cpu_gemv
from nanoserve.linear import Int8Linear, PackedLinear, quantize_per_channel

pytestmark = pytest.mark.skipif(not cpu_gemv.cpu_has_instructions(), reason="CPU lacks AVX-512 BF16 / VNNI")

# (O, K): K not a multiple of 16, 32 or 64 (the vector widths), O not a multiple of 16 (a block)
SHAPES = [(96, 64), (37, 50), (769, 771), (5, 33), (3, 1), (130, 3075)]


def _case(O: int, K: int, bias: bool, seed: int = 0, rows: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * torch.linspace(0.5, 2, rows)[:, None]   # rows of different scales
    w = torch.randn(O, K, generator=g) * 0.2
    b = torch.randn(O, generator=g) if bias else None
    return x, w, b


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_kernels_build_on_a_cpu_that_has_the_instructions():
    """On an AVX-512 BF16 + VNNI CPU the op builds (a failed build would silently fall back)."""
    assert cpu_gemv.is_available()


ROWS = [1, 3, 8]        # one token; a few; the most a call takes (cpu_gemv.MAX_ROWS)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("O,K", SHAPES)
def test_fp32_gemv_equals_f_linear(O, K, bias, rows):
    """gemv on fp32 weights is F.linear within 1e-4 for any O and K, with or without bias,
    for 1 to MAX_ROWS rows of x."""
    x, w, b = _case(O, K, bias, rows=rows)
    torch.testing.assert_close(cpu_gemv.gemv(x, cpu_gemv.pack(w), O, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("O,K", SHAPES)
def test_bf16_gemv_equals_f_linear_on_bf16_rounded_values(O, K, bias, rows):
    """gemv on bf16 weights rounds x to bf16 and sums in fp32: F.linear on the rounded x and W
    within 1e-4 relative, and the fp32 product within 1% of its norm."""
    x, w, b = _case(O, K, bias, rows=rows)
    wb = w.bfloat16()
    y = cpu_gemv.gemv(x, cpu_gemv.pack(wb), O, b)                          # (M, O) float32: x's dtype
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.bfloat16().float(), wb.float(), b), atol=1e-4, rtol=1e-4)
    assert _rel(y, F.linear(x, w, b)) < 1e-2


@pytest.mark.parametrize("rows", ROWS)
def test_bf16_gemv_returns_bf16_for_bf16_input(rows):
    """With x in bf16 (a bf16 model) the result is bf16: the fp32 sums rounded once."""
    x, w, b = _case(37, 50, True, rows=rows)
    wb, xb = w.bfloat16(), x.bfloat16()
    y = cpu_gemv.gemv(xb, cpu_gemv.pack(wb), 37, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(xb.float(), wb.float(), b).bfloat16(), atol=0, rtol=0)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("O,K", SHAPES)
def test_int8_gemv_equals_f_linear_on_the_quantized_values(O, K, bias, rows):
    """gemv on int8 weights quantizes x per token, each row with its own scale (max |x| -> 127,
    rounded half up) and sums exactly: F.linear on the dequantized x and W within 1e-4
    relative, fp32 within 5%."""
    x, w, b = _case(O, K, bias, rows=rows)
    q, scale = quantize_per_channel(w)
    y = cpu_gemv.gemv(x, cpu_gemv.pack(q), O, b, scale, cpu_gemv.int8_row_sums(q))
    amax = x.abs().amax(dim=1, keepdim=True)                                # (M, 1) a scale per row
    xq = torch.floor(x * (127 / amax) + 0.5) * (amax / 127)                # (M, K) dequantized
    ref = F.linear(xq, q.float() * scale[:, None], b)
    torch.testing.assert_close(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
    assert _rel(y, F.linear(x, w, b)) < 5e-2


@pytest.mark.parametrize("rows", [1, 20, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_gives_the_same_token_result_through_gemv_and_onednn(monkeypatch, dtype, rows):
    """Int8Linear's result is the same through cpu_gemv (1 row; 20 rows in chunks of 8) as
    through oneDNN (the same quantization of x and W, per row): the kernel is a drop-in for the
    module's batched path. (33 rows: both run oneDNN.)"""
    x, w, b = _case(130, 3075, True, rows=rows)
    fast = Int8Linear(w, b)
    monkeypatch.setattr(cpu_gemv, "is_available", lambda: False)
    slow = Int8Linear(w, b)
    assert fast.gemv_weight is not None and slow.gemv_weight is None
    y_fast, y_slow = fast(x.to(dtype)), slow(x.to(dtype))
    assert y_fast.dtype == dtype
    torch.testing.assert_close(y_fast.float(), y_slow.float(), atol=1e-3 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_packed_linear_runs_gemv_for_few_tokens_and_onednn_for_more(monkeypatch):
    """PackedLinear gives F.linear's result (1e-4) for 1 and MAX_ROWS tokens (gemv) and for
    MAX_ROWS + 1 (oneDNN), each through the path it says."""
    x, w, b = _case(37, 50, True, rows=cpu_gemv.MAX_ROWS + 1)
    lin = PackedLinear(w, b)
    assert lin.gemv_weight is not None
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    for n in (1, cpu_gemv.MAX_ROWS, cpu_gemv.MAX_ROWS + 1):
        torch.testing.assert_close(lin(x[:n]), F.linear(x[:n], w, b), atol=1e-4, rtol=1e-4)
    assert calls == [1, cpu_gemv.MAX_ROWS]


def test_gemv_rejects_more_rows_than_it_takes():
    """The op takes 1 to 8 rows: 9 is an error naming the shape, not a wrong result."""
    x, w, b = _case(37, 50, True, rows=9)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        cpu_gemv.gemv(x, cpu_gemv.pack(w), 37, b)


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "odd_ckpt"])
def test_engine_greedy_tokens_are_unchanged_by_gemv_in_float32(request, monkeypatch, ckpt):
    """The fp32 engine generates the same greedy tokens with the one-token kernels as without
    (oneDNN), for one sequence (every decode step runs gemv) and for the odd-sized model."""
    path = str(request.getfixturevalue(ckpt))
    prompts = [[464, 3139, 286, 4881, 318], [50, 1000, 7, 42, 99, 2001, 11]]
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fast = LLM(path, device="cpu", quiet=True)
    assert fast.engine.model.fast_head.gemv_weight is not None
    got = [fast.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    monkeypatch.setattr(cpu_gemv, "is_available", lambda: False)
    slow = LLM(path, device="cpu", quiet=True)
    assert slow.engine.model.fast_head.gemv_weight is None
    assert got == [slow.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def test_a_failed_build_warns_once_and_falls_back_to_onednn(monkeypatch):
    """If the C++ build fails, is_available() is False with one RuntimeWarning naming the
    build, and the linears keep oneDNN (no gemv weights)."""
    def broken_build() -> None:
        raise OSError("no compiler")
    monkeypatch.setattr(cpu_gemv, "_build", broken_build)
    monkeypatch.setattr(cpu_gemv, "_state", {})
    with pytest.warns(RuntimeWarning, match="building the AVX-512 GEMV") as record:
        assert not cpu_gemv.is_available()
        assert not cpu_gemv.is_available()                 # asked again: no second warning
    assert len(record) == 1
    _, w, b = _case(37, 50, True)
    assert PackedLinear(w, b).gemv_weight is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot", [0, 21, 39, -1])
def test_write_kv_one_writes_exactly_what_write_kv_writes(dtype, slot):
    """write_kv_one (the compiled CPU step's K/V write) stores one token's K/V rows, taken as
    strided views of a fused qkv row, into the head-major pool exactly as attention.write_kv
    does; slot -1 (padding) writes nothing; every other slot keeps its value."""
    from nanoserve.attention import write_kv
    assert cpu_gemv.is_available()
    NB, BS, H, D = 5, 8, 3, 16
    g = torch.Generator().manual_seed(slot + 2)
    qkv = torch.randn(1, 3, H, D, generator=g).to(dtype)
    k, v = qkv[:, 1], qkv[:, 2]                                   # (1, H, D) views, as model.py makes them
    pool = torch.randn(2, NB, H, BS, D, generator=g).to(dtype).transpose(2, 3)   # (2, NB, BS, H, D) head-major
    want = pool.clone()
    slots = torch.tensor([slot])
    write_kv(k, v, want[0], want[1], slots)
    torch.ops.nanoserve_cpu.write_kv_one(k, v, pool[0], pool[1], slots)
    assert torch.equal(pool, want)
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.nanoserve_cpu.write_kv_one(k, v, pool[0], pool[1], torch.tensor([NB * BS]))


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:                  # a mapping's first line: start-end perms ...
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only: /proc/self/smaps")
def test_packed_weights_live_in_memory_advised_for_huge_pages():
    """pack() puts a large W in a 2 MiB-aligned mapping advised for transparent huge pages
    (VmFlags "hg"), with the same values as a plain repack; a small W stays in torch's memory."""
    assert cpu_gemv.is_available()
    w = torch.randn(3000, 770).bfloat16()                    # 4.6 MiB packed
    wp = cpu_gemv.pack(w)
    assert wp.data_ptr() % (2 << 20) == 0 and "hg" in _vm_flags(wp.data_ptr())
    plain = torch.zeros(3008, 770, dtype=w.dtype)
    plain[:3000] = w
    assert torch.equal(wp, plain.view(188, 16, 385, 2).permute(0, 2, 1, 3))
    small = cpu_gemv.pack(torch.randn(16, 16))
    assert "hg" not in _vm_flags(small.data_ptr())
    x = torch.randn(1, 770)                                   # and the op reads it as before
    torch.testing.assert_close(cpu_gemv.gemv(x, wp, 3000, None), F.linear(x.bfloat16().float(), w.float()),
                               atol=1e-3, rtol=1e-3)
