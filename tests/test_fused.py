"""fused.py's compiled decode steps against model.py's eager forward, on the CPU.

compile_decode: on a GPU the engine captures this compiled step in its CUDA graphs
(tests/test_gpu.py checks its tokens there). Here the same graph runs with attention.py's
reference inside the custom ops, so CI exercises the compilation, the custom ops and their
in-place cache writes.

compile_cpu_decode: the CPU's one-sequence step (EngineConfig(fused_decode=True) on a CPU),
checked against the eager engine in float32 (exact tokens, logprobs within 1e-4), bfloat16 and
int8 (the same oneDNN kernels as eager, fused differently: logprobs within 0.05 and 0.02 nats).
Each compilation of the tiny model takes a few seconds, so each mode compiles once.

S = sequences   H = heads   D = head_dim   NB = blocks in pool   BS = block size   MB = blocks per sequence
"""
import pytest
import torch

from nanoserve import LLM
from nanoserve.attention import AttentionMetadata
from nanoserve.config import GPT2Config
from nanoserve.fused import compile_cpu_decode, compile_decode
from nanoserve.model import GPT2
from nanoserve.weights import load_state_dict

from conftest import count_cpu_decode_calls, decode_step_vs_eager, greedy_with_logprobs

NB, BS, MB = 24, 16, 3


def _decode_step(cfg: GPT2Config, num_seqs: int, num_padding: int) -> tuple:
    """A decode step as the runner's CUDA graphs see it: one token per sequence in random
    blocks, then padding rows (slot -1, context 1 over block 0). Returns ids, positions, meta."""
    ctx = torch.randint(1, MB * BS + 1, (num_seqs,))                               # (S,)
    bt = torch.randperm(NB)[:num_seqs * MB].view(num_seqs, MB).to(torch.int32)      # (S, MB)
    slots = [int(bt[s, (c - 1) // BS]) * BS + (c - 1) % BS for s, c in enumerate(ctx.tolist())]
    S = num_seqs + num_padding
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots + [-1] * num_padding),
        block_tables=torch.cat([bt, torch.zeros(num_padding, MB, dtype=torch.int32)]),
        context_lens=torch.cat([ctx, torch.ones(num_padding, dtype=ctx.dtype)]).to(torch.int32),
        query_start_loc=torch.arange(S + 1, dtype=torch.int32), max_query_len=1, max_context_len=cfg.n_ctx)
    ids = torch.randint(0, cfg.vocab_size, (S,))
    positions = torch.cat([ctx - 1, torch.zeros(num_padding, dtype=ctx.dtype)])
    return ids, positions, meta


@pytest.fixture(scope="module")
def eager_and_fused(tiny_ckpt):
    """One step (5 sequences + 2 padding rows) run eagerly and compiled, each on its own copy of
    one random KV pool: (pool before, (logits, pool after) eager, (logits, pool after) fused)."""
    torch.manual_seed(0)
    cfg = GPT2Config.from_json(tiny_ckpt / "config.json")
    model = GPT2(cfg)
    model.load_weights(load_state_dict(tiny_ckpt, cfg))
    model.eval()
    pool = torch.randn(cfg.n_layer, 2, NB, BS, cfg.n_head, cfg.head_dim)          # (L, 2, NB, BS, H, D)
    ids, positions, meta = _decode_step(cfg, num_seqs=5, num_padding=2)
    with torch.inference_mode():
        kv_eager, kv_fused = pool.clone(), pool.clone()
        eager = model.compute_logits(model(ids, positions, kv_eager, meta))
        fused = compile_decode(model)(ids, positions, kv_fused, meta)
    return pool, (eager, kv_eager), (fused, kv_fused)


def test_compiled_decode_logits_equal_eager_forward(eager_and_fused):
    """The compiled step gives the eager forward's logits (fp32, within rounding), padding rows too."""
    _, (eager, _), (fused, _) = eager_and_fused
    assert fused.shape == eager.shape
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_compiled_decode_writes_the_kv_pool_in_place(eager_and_fused):
    """The compiled step writes this step's K/V into the caller's pool (not into a copy), at the
    same slots as the eager forward, and padding rows write nothing."""
    pool, (_, kv_eager), (_, kv_fused) = eager_and_fused
    written = kv_eager != pool
    assert written.any(), "the eager step should have written K/V"
    assert torch.equal(kv_fused != pool, written)
    torch.testing.assert_close(kv_fused, kv_eager, atol=1e-5, rtol=1e-5)


def test_fused_decode_true_with_enforce_eager_raises(tiny_ckpt):
    """fused_decode=True together with enforce_eager=True (no compiled steps) is refused, naming the fix."""
    with pytest.raises(ValueError, match="fused_decode=True needs .* enforce_eager=False"):
        LLM(str(tiny_ckpt), device="cpu", quiet=True, fused_decode=True, enforce_eager=True)


# ---- compile_cpu_decode --------------------------------------------------------------------
PROMPT = [464, 3139, 286, 4881, 318, 6342, 13, 383, 198, 50, 1000, 7, 42, 99, 2001, 50256, 11]
MODES = {"float32": dict(), "bfloat16": dict(dtype="bfloat16"), "int8": dict(quantization="int8")}
# Largest difference of a logit or K/V value, compiled step vs eager forward, per mode: float32
# and int8 (integer products, float32 elsewhere) to rounding; bfloat16 rounds each op's output
# to 8 bits of mantissa, and fusion changes which intermediates get rounded: a few bf16 steps
# at |logit| ~ 8 (measured: 0.06, and 0.16 for bf16 with int8).
TOL = {"float32": 1e-4, "bfloat16": 0.25, "int8": 1e-4}


_ENGINES: dict[str, LLM] = {}


def _fused_engine(ckpt, mode: str) -> LLM:
    """An engine whose one-sequence steps run compile_cpu_decode in `mode`, one per mode for this
    file: each compiles its step once, on first use (seconds), and keeps it. (fused_decode=True
    picks cpu_step.py's C++ step instead where cpu_gemv runs: tests/test_cpu_step.py.)"""
    if mode not in _ENGINES:
        _ENGINES[mode] = _compiled_engine(ckpt, **MODES[mode])
    return _ENGINES[mode]


def _compiled_engine(ckpt, **kw) -> LLM:
    llm = LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, fused_decode=True, num_blocks=16, **kw)
    llm.engine.runner.cpu_decode = compile_cpu_decode(llm.engine.model)
    llm.engine.runner.cpu_decode_seqs = 1          # the compiled step takes one sequence
    return llm


@pytest.mark.parametrize("mode", list(MODES))
def test_cpu_fused_step_gives_the_eager_forwards_logits_and_kv_writes(tiny_ckpt, mode):
    """On one random KV pool, the compiled one-sequence step gives the eager forward's logits
    and writes the same K/V to the same slot of the caller's pool, within TOL of its mode."""
    pool, (eager, kv_eager), (fused, kv_fused) = decode_step_vs_eager(_fused_engine(tiny_ckpt, mode))
    fused = fused.float()                                                              # (1, V)
    torch.testing.assert_close(fused, eager, atol=TOL[mode], rtol=0)
    written = kv_eager != pool
    assert written.any() and torch.equal(kv_fused != pool, written)
    torch.testing.assert_close(kv_fused, kv_eager, atol=TOL[mode], rtol=0)


def test_cpu_fused_decode_keeps_float32_greedy_tokens(tiny_ckpt, tiny_llm):
    """In float32 a request decoded by compiled steps (all of its steps after the prompt's) gets
    the eager engine's greedy tokens, each with its logprob within 1e-4. (bf16 and int8 are
    checked step by step above: on the tiny random model, near-tied logits make greedy bf16
    tokens part ways after a step or two whichever path runs.)"""
    llm = _fused_engine(tiny_ckpt, "float32")
    calls = count_cpu_decode_calls(llm)
    [(tokens, lps)] = greedy_with_logprobs(llm, [PROMPT])
    [(eager_tokens, eager_lps)] = greedy_with_logprobs(tiny_llm, [PROMPT])
    assert len(calls) == len(tokens) - 1
    assert tokens == eager_tokens
    torch.testing.assert_close(lps, eager_lps, atol=1e-4, rtol=0)


def test_cpu_fused_decode_leaves_batched_steps_to_the_eager_forward(tiny_ckpt, tiny_llm):
    """Steps with several sequences run the eager forward (no compiled call), with the eager
    engine's tokens."""
    llm = _fused_engine(tiny_ckpt, "float32")
    calls = count_cpu_decode_calls(llm)
    prompts = [PROMPT, PROMPT[:9]]
    assert [t for t, _ in greedy_with_logprobs(llm, prompts, 6)] == [t for t, _ in greedy_with_logprobs(tiny_llm, prompts, 6)]
    assert calls == []


def test_cpu_fused_engines_with_different_weights_each_decode_with_their_own(tiny_ckpt, tiny_llm, tmp_path):
    """Two fused engines in one process, same shapes, other weights: each keeps its own greedy
    tokens, also after the other compiled (the compiled steps bake their weights in as constants,
    so handing one engine the other's compiled step would change its tokens)."""
    from conftest import make_hf_model, save_checkpoint
    other_ckpt = save_checkpoint(make_hf_model(seed=5), tmp_path / "other", layout="hub")
    other_eager = LLM(str(other_ckpt), device="cpu", quiet=True)
    first = _fused_engine(tiny_ckpt, "float32")
    other = _compiled_engine(other_ckpt)
    [(other_tokens, _)] = greedy_with_logprobs(other, [PROMPT], 12)
    [(first_tokens, _)] = greedy_with_logprobs(first, [PROMPT], 12)
    assert other_tokens == greedy_with_logprobs(other_eager, [PROMPT], 12)[0][0]
    assert first_tokens == greedy_with_logprobs(tiny_llm, [PROMPT], 12)[0][0] != other_tokens
