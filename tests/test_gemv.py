"""gemv.py's small-M linear against F.linear, alone, as a custom op under torch.compile, and
swapped into the model.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py),
so shapes are tiny; N and K are chosen so that no tile divides them. On a GPU the same tests run
the compiled kernel (tests/test_gpu.py checks the engine's tokens there).

M = rows of x   K = in features   N = out features
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from nanoserve import LLM, gemv  # noqa: E402
from nanoserve.attention import AttentionMetadata  # noqa: E402
from nanoserve.fused import compile_decode  # noqa: E402
from nanoserve.model import Conv1D  # noqa: E402
from conftest import load_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 37, 100                 # neither is a multiple of any tile
SMALL_TILE = (4, 32, 4)        # BLOCK_N, BLOCK_K, num_warps: 10 N-tiles, 4 K-steps (the last ragged)
# Against an fp32 reference: fp32 differs by summation order only; fp16 and bf16 by the
# rounding of the output (11 and 8 bits of mantissa; outputs are O(1) here).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _operands(M: int, dtype: torch.dtype, bias: bool, seed: int = 0) -> tuple:
    """x (M, K), W (N, K), b (N,) or None, scaled so that outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    return tuple(None if t is None else t.to(device=DEVICE, dtype=dtype) for t in (x, w, b))


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp32 on the same (rounded) inputs: (M, K) -> (M, N)."""
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M", range(1, 9))
def test_kernel_equals_f_linear_in_float32_for_every_m_up_to_8(M, bias):
    """For 1 to 8 rows (the engine uses it up to MAX_M, but the kernel serves any M), with or
    without bias, the kernel gives F.linear's fp32 result (to summation order) when no tile
    divides N or K."""
    x, w, b = _operands(M, torch.float32, bias, seed=M)
    got = gemv.gemv(x, w, b, SMALL_TILE)
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(x, w, b), atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_half_precision_kernel_accumulates_in_float32(M, dtype):
    """With fp16 or bf16 operands the kernel is the fp32 product of those operands, rounded once
    to the output dtype: within one rounding step of the output."""
    x, w, b = _operands(M, dtype, bias=True, seed=10 + M)
    got = gemv.gemv(x, w, b, SMALL_TILE)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(x, w, b), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("M", [1, 2, 5, 8])
def test_default_tiles_of_each_m_bucket_equal_f_linear(M):
    """pick_config's tile for each M bucket (K tiles wider than K here) gives F.linear's result."""
    x, w, b = _operands(M, torch.float32, bias=True, seed=20 + M)
    torch.testing.assert_close(gemv.gemv(x, w, b), _reference(x, w, b), atol=1e-5, rtol=1e-5)


def test_default_tiles_keep_accumulators_within_the_register_budget():
    """For every M up to 16, pick_config's tile holds at most MAX_ACC_PER_THREAD fp32
    accumulators per thread, and M = 1 gets the tile measured fastest in gemv.log (2 x 1024, 4 warps)."""
    assert gemv.pick_config(1) == (2, 1024, 4)
    for M in range(1, 17):
        BLOCK_N, BLOCK_K, num_warps = gemv.pick_config(M)
        BM = 1 << (M - 1).bit_length()
        assert BM * BLOCK_N * BLOCK_K // (32 * num_warps) <= gemv.MAX_ACC_PER_THREAD


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5])
def test_gelu_epilogue_gives_gelu_tanh_of_the_linear(M, dtype):
    """gelu=True applies GPT-2's gelu_new (tanh form) to the fp32 sum before rounding: it
    equals F.gelu(F.linear(...), approximate="tanh") to the output dtype's rounding."""
    x, w, b = _operands(M, dtype, bias=True, seed=50 + M)
    got = gemv.gemv(x, w, b, SMALL_TILE, gelu=True)
    want = F.gelu(_reference(x, w, b), approximate="tanh")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_a_strided_input_gives_the_contiguous_result():
    """x as a column slice of a wider tensor (row stride != K) gives the same result as its copy."""
    x, w, b = _operands(3, torch.float32, bias=True, seed=30)
    wide = torch.cat([x, torch.ones_like(x)], dim=1)                 # (M, 2K)
    torch.testing.assert_close(gemv.gemv(wide[:, :K], w, b), gemv.gemv(x, w, b), atol=0, rtol=0)


def test_off_cuda_linear_is_f_linear():
    """On the CPU (and for M > MAX_M) linear() is F.linear itself, bit for bit: prefill, CPU
    engines and tests run the same arithmetic as before."""
    x, w, b = _operands(gemv.MAX_M + 1, torch.float32, bias=True, seed=40)
    x, w, b = x.cpu(), w.cpu(), b.cpu()
    assert not gemv.uses_kernel(x) and not gemv.uses_kernel(x[:1])
    assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemv.gemv_op(x, w, b), F.linear(x, w, b))


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let linear() choose the kernel for CPU tensors too (the interpreter runs it), counting calls."""
    calls = []
    real = gemv.gemv

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(gemv, "uses_kernel", lambda x: 1 <= x.shape[0] <= gemv.MAX_M)
    monkeypatch.setattr(gemv, "gemv", counted)
    return calls


def test_the_op_inside_torch_compile_equals_eager(kernel_on_cpu):
    """gemv_op in a torch.compile'd function (fullgraph, batch dimension dynamic) runs the kernel
    and gives eager linear()'s result, for M = 1 and M = MAX_M."""
    torch.compiler.reset()
    w1, b1, w2 = (t.to(DEVICE) for t in (torch.randn(N, K) / K ** 0.5, torch.randn(N),
                                         torch.randn(N, N) / N ** 0.5))      # (N, K), (N,), (N, N)

    def two_layers(x: torch.Tensor) -> torch.Tensor:                         # (M, K) -> (M, N)
        h = F.gelu(gemv.linear(x, w1, b1))                                   # (M, N)
        return gemv.linear(h, w2)                                            # (M, N)
    compiled = torch.compile(two_layers, fullgraph=True)
    for M in (1, gemv.MAX_M):
        x = torch.randn(M, K, device=DEVICE)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        eager = two_layers(x)
        del kernel_on_cpu[:]
        got = compiled(x)
        assert kernel_on_cpu == [M, M], "the compiled function should have run the kernel twice"
        torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)


def test_use_gemv_linears_swaps_every_conv1d_keeping_names_and_tensors(tiny_ckpt):
    """After the swap no Conv1D is left, the state dict has the same names holding the same
    storage (nothing copied), and fast_head reads the tied head (wte) in place."""
    model = load_model(tiny_ckpt)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    gemv.use_gemv_linears(model)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert isinstance(model.h[0].attn.c_attn, gemv.GemvLinear)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert model.fast_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert model.fast_head.bias is None


def test_swapped_model_decoding_one_token_through_the_kernel_equals_the_plain_model(tiny_ckpt, kernel_on_cpu,
                                                                                    monkeypatch):
    """One decode token (M = 1) through the swapped model runs every linear in the kernel, the
    MLP's GELU inside c_fc's kernel (not again after it), and gives the plain model's logits."""
    # Wide tiles: the head's 50,257 rows in 2-row programs took Triton's interpreter 75 s.
    monkeypatch.setattr(gemv, "pick_config", lambda M: (64, 64, 4))
    plain, swapped = load_model(tiny_ckpt).to(DEVICE), load_model(tiny_ckpt).to(DEVICE)
    gemv.use_gemv_linears(swapped)
    assert all(b.mlp.fc_applies_gelu and b.mlp.c_fc.gelu for b in swapped.h)
    cfg, BS = plain.config, 16
    torch.manual_seed(1)
    pool = torch.randn(cfg.n_layer, 2, 4, BS, cfg.n_head, cfg.head_dim, device=DEVICE)   # (L, 2, NB, BS, H, D)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(slot_mapping=torch.tensor([BS + 3], device=DEVICE), block_tables=torch.tensor([[2, 1]], **i32),
                             context_lens=torch.tensor([20], **i32), query_start_loc=torch.arange(2, **i32),
                             max_query_len=1, max_context_len=20)
    ids, positions = torch.tensor([500], device=DEVICE), torch.tensor([19], device=DEVICE)
    with torch.inference_mode():
        ref = plain.compute_logits(plain(ids, positions, pool.clone(), meta))      # (1, V)
        got = swapped.compute_logits(swapped(ids, positions, pool.clone(), meta))
    assert len(kernel_on_cpu) == 4 * cfg.n_layer + 1, "every linear and the head should run the kernel"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_swapped_model_in_the_compiled_decode_step_equals_the_eager_model(tiny_ckpt):
    """fused.py's compiled decode step over the swapped model (its linears as gemv ops) gives
    the logits of the unswapped eager model, for a batch of 3 decode tokens."""
    plain, swapped = load_model(tiny_ckpt), load_model(tiny_ckpt)
    gemv.use_gemv_linears(swapped)
    cfg, NB, BS = plain.config, 8, 16
    torch.manual_seed(0)
    pool = torch.randn(cfg.n_layer, 2, NB, BS, cfg.n_head, cfg.head_dim)          # (L, 2, NB, BS, H, D)
    ctx = torch.tensor([5, 17, 30], dtype=torch.int32)                             # (S,)
    bt = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)                 # (S, MB)
    slots = [int(bt[s, (c - 1) // BS]) * BS + (c - 1) % BS for s, c in enumerate(ctx.tolist())]
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=bt, context_lens=ctx,
                             query_start_loc=torch.arange(4, dtype=torch.int32), max_query_len=1,
                             max_context_len=cfg.n_ctx)
    ids, positions = torch.tensor([11, 500, 50256]), ctx.long() - 1
    with torch.inference_mode():
        ref = plain.compute_logits(plain(ids, positions, pool.clone(), meta))      # (S, V)
        got = compile_decode(swapped)(ids, positions, pool.clone(), meta)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_gemv_true_without_cuda_graphs_raises(tiny_ckpt):
    """gemv=True where no CUDA graphs are captured (here: the CPU) is refused, naming the fix."""
    with pytest.raises(ValueError, match="gemv=True needs CUDA graphs"):
        LLM(str(tiny_ckpt), device="cpu", quiet=True, gemv=True)
