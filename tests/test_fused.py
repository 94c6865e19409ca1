"""fused.py's compiled decode step against model.py's eager forward, on the CPU.

On a GPU the engine captures this compiled step in its CUDA graphs (tests/test_gpu.py checks
its tokens there). Here the same graph runs with attention.py's reference inside the custom ops,
so CI exercises the compilation, the custom ops and their in-place cache writes.

S = sequences   H = heads   D = head_dim   NB = blocks in pool   BS = block size   MB = blocks per sequence
"""
import pytest
import torch

from nanoserve import LLM
from nanoserve.attention import AttentionMetadata
from nanoserve.config import GPT2Config
from nanoserve.fused import compile_decode
from nanoserve.model import GPT2
from nanoserve.weights import load_state_dict

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


def test_fused_decode_true_without_cuda_graphs_raises(tiny_ckpt):
    """fused_decode=True where no CUDA graphs are captured (here: the CPU) is refused, naming the fix."""
    with pytest.raises(ValueError, match="fused_decode=True needs CUDA graphs"):
        LLM(str(tiny_ckpt), device="cpu", quiet=True, fused_decode=True)
