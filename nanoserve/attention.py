"""Attention over a paged (block-table) KV cache: the pure-PyTorch reference.

Every attention layer does two things per step:
  1. write this step's K and V for each token into its slot of the cache
     (slot = block_id * BS + offset inside the block, computed by the runner);
  2. for each sequence, attend from its new query tokens to every K/V it has so far
     (earlier steps' and this step's), found through the sequence's block table.

A step mixes sequences freely: a decode token (1 query), a prefill chunk (many queries whose
keys include earlier chunks), a whole prompt. Query token j of a sequence sits at absolute
position context_len - query_len + j, and may see keys at positions <= its own (causal).
With a sliding window W (EngineConfig.attention_window) it sees only the last W of them,
positions p-W+1 .. p: a band mask. The scheduler then frees blocks that fell out of every
future query's window; their block-table entries are holes (-1) that attention never reads.

This file is the reference, written for clarity: K/V of all sequences in the step are gathered
into one padded (S, T) layout and one SDPA call serves the whole batch, prefill and decode alike.
The fast paths are tested against it: kernels.py (Triton, GPU) and cpu_attention.py (decode
steps on a CPU); the engine swaps them into the model (GPT2.attn_fn).

N = tokens in this step (all sequences, flattened)   S = sequences in batch
H = n_head  D = head_dim  NB = KV blocks in pool   BS = tokens per block   MB = max blocks per sequence
T = longest context in the step (padded)   Q = longest query in the step (padded)

References: vLLM PagedAttention paper (Kwon et al. 2023), vLLM `flash_attn` backend metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import cdiv


@dataclass
class AttentionMetadata:
    """Describes one step's token batch to every attention layer. Built by the runner."""
    slot_mapping: torch.Tensor     # (N,) int64: cache slot of each token; -1 = padding, not written
    block_tables: torch.Tensor     # (S, MB) int32: KV block ids of each sequence, padded with 0
    context_lens: torch.Tensor     # (S,) int32: tokens in cache after this step's write
    query_start_loc: torch.Tensor  # (S+1,) int32: sequence s owns tokens [qsl[s], qsl[s+1])
    max_query_len: int             # host-side maxima, so kernels size their grids without a sync
    max_context_len: int
    attention_window: int | None = None   # sliding window W: a query at position p sees keys
                                          # p-W+1 .. p only; None: every earlier key

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence contributes exactly one query token."""
        return self.max_query_len == 1


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each token's K/V at its slot.  k, v: (N, H, D) -> k_cache, v_cache: (NB, BS, H, D).

    Tokens with slot -1 (padding added for CUDA graphs) are skipped. Works for any memory
    layout of the cache (kv_cache.py stores blocks head-major)."""
    BS = k_cache.shape[1]
    if k.shape[0] == 1 and not k.is_cuda:
        # One token on a CPU (one sequence decoding): two copies into the slot's views. The
        # general path below is ~8 small ops, ~50 us a layer, 5-10% of a one-token int8 step.
        slot = int(slot_mapping[0])                             # reading it costs no sync on a CPU
        if slot >= 0:
            k_cache[slot // BS, slot % BS] = k[0]
            v_cache[slot // BS, slot % BS] = v[0]
        return
    valid = slot_mapping >= 0                                   # (N,)
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    block, offset = slot_mapping // BS, slot_mapping % BS       # (N,), (N,)
    k_cache[block, offset] = k
    v_cache[block, offset] = v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached keys.

    Args:
        q: (N, H, D) queries of this step, sequences back to back (query_start_loc).
        k_cache, v_cache: (NB, BS, H, D) the pool, already holding this step's K/V.
        meta: the step's layout. scale: usually 1/sqrt(D).
    Returns:
        (N, H, D) attention output, same order as q. Padding tokens (beyond the last
        sequence's end) get zeros.
    """
    N, H, D = q.shape
    BS = k_cache.shape[1]
    dev = q.device
    qsl = meta.query_start_loc.long()                          # (S+1,)
    q_lens = qsl[1:] - qsl[:-1]                                # (S,)
    ctx = meta.context_lens.long()                             # (S,)
    Q, T = meta.max_query_len, meta.max_context_len

    # Gather each sequence's K/V through its block table into a padded (S, T) layout. A CUDA
    # graph is captured with max_context_len = n_ctx over a narrower table: use the columns there
    # are. (Holes of evicted blocks, -1, gather the pool's last block: the band mask hides them.)
    blocks = meta.block_tables[:, :cdiv(T, BS)].long()         # (S, nb)
    T = min(T, blocks.shape[1] * BS)
    k = k_cache[blocks].flatten(1, 2)[:, :T]                   # (S, T, H, D)
    v = v_cache[blocks].flatten(1, 2)[:, :T]                   # (S, T, H, D)

    # Scatter the flat queries into a padded (S, Q) layout.
    j = torch.arange(Q, device=dev)                            # (Q,)
    q_valid = j[None, :] < q_lens[:, None]                     # (S, Q)
    q_idx = (qsl[:-1, None] + j[None, :]).clamp(max=N - 1)     # (S, Q) flat token index
    qp = q[q_idx]                                              # (S, Q, H, D)

    # Query j of sequence s is at absolute position ctx - q_len + j; key t is visible if t <= that.
    q_pos = ctx[:, None] - q_lens[:, None] + j[None, :]        # (S, Q)
    t = torch.arange(T, device=dev)                            # (T,)
    mask = t[None, None, :] <= q_pos[:, :, None]               # (S, Q, T), also hides t >= ctx
    if meta.attention_window is not None:                      # the band: t > q_pos - W
        mask &= t[None, None, :] > q_pos[:, :, None] - meta.attention_window
    mask = mask & q_valid[:, :, None]
    # Fully masked rows (padding queries) would give NaN; let them see key 0 and drop them later.
    mask[:, :, 0] |= ~q_valid

    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # (S, H, Q|T, D)
        attn_mask=mask[:, None], scale=scale)                        # -> (S, H, Q, D)
    out = out.transpose(1, 2)                                        # (S, Q, H, D)

    result = torch.zeros_like(q)                                     # (N, H, D)
    result[q_idx[q_valid]] = out[q_valid]
    return result


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float, window: int | None = None) -> torch.Tensor:
    """One sequence, no cache: (T, H, D) x3 -> (T, H, D). The oracle for the paged path;
    with a window, token i sees tokens i-window+1 .. i (the band mask)."""
    T = q.shape[0]
    i = torch.arange(T, device=q.device)
    band = None if window is None else (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)   # (T, T)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=band, is_causal=band is None, scale=scale)   # (H, T, D)
    return out.transpose(0, 1)
