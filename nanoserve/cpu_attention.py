"""Paged decode attention tuned for the CPU: a fast path, tested against attention.py.

attention.paged_attention is the reference: one padded SDPA call for any step. On a CPU its
cost at decode is not the attention itself but re-laying out the gathered K/V into the padded
(S, H, T, D) tensors SDPA wants. The decode steps (one query per sequence, most of a
generation) are therefore computed here differently, with the same result:

  decode_attention       eager PyTorch, block by block: with head-major blocks (kv_cache.py)
                         each (block, head) is a contiguous (BS, D) matrix, so scores and the
                         weighted sum are batched matrix-vector products on the gathered blocks.
  compiled_attention()   the same written elementwise (fused_decode_attention) for
                         torch.compile, which fuses it into one C++ loop nest that reads each
                         cached K/V once; fused.compile_cpu_decode inlines it the same way.

Both have paged_attention's signature and fall back to the reference for steps with prefill
tokens. The engine swaps one of them into GPT2.attn_fn on a CPU (EngineConfig.compile_cpu_attention
picks the compiled one), as it swaps in kernels.py's Triton kernels on a GPU;
tests/test_attention.py checks both against the reference.

N = tokens in this step   S = sequences in batch   H = n_head   D = head_dim
NB = KV blocks in pool   BS = tokens per block   MB = max blocks per sequence
nb = blocks holding this step's longest context   T = nb * BS keys per sequence (padded)
"""
from __future__ import annotations

import torch

from .attention import AttentionFn, AttentionMetadata, paged_attention as reference_attention
from .config import cdiv


def _is_decode_only(q: torch.Tensor, meta: AttentionMetadata) -> bool:
    """One query per sequence and no padding tokens: the case this file speeds up."""
    return meta.is_decode and q.shape[0] == meta.num_seqs


def _used_blocks(meta: AttentionMetadata, BS: int) -> torch.Tensor:
    """The block-table columns that hold any of this step's context: (S, MB) -> (S, nb)."""
    return meta.block_tables[:, :cdiv(meta.max_context_len, BS)].long()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """paged_attention, with decode steps done block by block: q (N, H, D) -> (N, H, D)."""
    if not _is_decode_only(q, meta):
        return reference_attention(q, k_cache, v_cache, meta, scale)
    BS, W = k_cache.shape[1], meta.attention_window
    # With a sliding window, blocks before every sequence's window are not read at all (on a
    # CPU, context_lens is host memory: reading its minimum costs no sync).
    first = 0 if W is None else max(0, int(meta.context_lens.min()) - W) // BS
    blocks = _used_blocks(meta, BS)[:, first:]                 # (S, nb)
    nb = blocks.shape[1]
    kh, vh = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (NB, H, BS, D) head-major
    S, H, D = q.shape
    k, v = kh[blocks], vh[blocks]                              # (S, nb, H, BS, D) each
    scores = torch.matmul(k, q[:, None, :, :, None])[..., 0]   # (S, nb, H, BS)
    scores = scores.transpose(1, 2).reshape(S, H, nb * BS) * scale   # (S, H, T)
    t = torch.arange(first * BS, (first + nb) * BS, device=q.device)   # (T,) key positions
    beyond = t[None, :] >= meta.context_lens[:, None]          # (S, T) keys not yet written
    if W is not None:                                          # and keys before the window
        beyond |= t[None, :] < meta.context_lens[:, None] - W
    probs = scores.masked_fill(beyond[:, None, :], float("-inf")).softmax(dim=-1)   # (S, H, T)
    probs = probs.view(S, H, nb, BS).transpose(1, 2)[..., None, :]   # (S, nb, H, 1, BS)
    return torch.matmul(probs, v)[..., 0, :].sum(dim=1)        # (S, H, D)


def fused_decode_attention(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, blocks: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """decode_attention's computation written elementwise, for torch.compile to fuse.

    q (S, H, D), kh/vh (NB, H, BS, D) head-major pool, blocks (S, nb) -> (S, H, D)."""
    nb, BS = blocks.shape[1], kh.shape[2]
    scores = (kh[blocks] * q[:, None, :, None, :]).sum(-1) * scale      # (S, nb, H, BS)
    t = torch.arange(nb * BS, device=q.device).view(nb, BS)            # (nb, BS) key positions
    scores = scores.masked_fill(t[None, :, None, :] >= context_lens[:, None, None, None], float("-inf"))
    # Softmax over all of a sequence's keys, which span two axes here (nb, BS).
    probs = torch.exp(scores - scores.amax(dim=(1, 3), keepdim=True))   # (S, nb, H, BS)
    out = (probs[..., None] * vh[blocks]).sum(dim=(1, 3))               # (S, H, D)
    return out / probs.sum(dim=(1, 3))[..., None]


# On a CPU the gathers cost more than the arithmetic: eager PyTorch copies every gathered
# block before using it. torch.compile turns fused_decode_attention into one C++ loop nest
# that reads each cached K/V once (measured 1.8 ms vs 6 ms eager for 32 sequences of 128 tokens, one layer,
# 2 cores). It needs a C++ compiler and ~10 s the first time, so it is opt-in
# (EngineConfig.compile_cpu_attention).
def compiled_attention() -> AttentionFn:
    """A paged_attention whose decode steps run the torch.compile'd fused_decode_attention."""
    fused = torch.compile(fused_decode_attention, dynamic=True)

    def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not _is_decode_only(q, meta):
            return reference_attention(q, k_cache, v_cache, meta, scale)
        if meta.attention_window is not None:       # not fused: the eager path skips dead blocks
            return decode_attention(q, k_cache, v_cache, meta, scale)
        blocks = _used_blocks(meta, k_cache.shape[1])                   # (S, nb)
        return fused(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), blocks,
                     meta.context_lens.long(), scale)                   # (S, H, D)
    return attention
