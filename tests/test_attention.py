"""Paged attention (the PyTorch reference) against dense causal attention, and the CPU fast
path (cpu_attention.py) against the reference."""
from __future__ import annotations

import math

import pytest
import torch

from nanoserve import cpu_attention
from nanoserve.attention import AttentionMetadata, dense_causal_attention, paged_attention, write_kv


def _paged_step(seqs: list[tuple[int, int]], H: int, D: int, BS: int, NB: int, seed: int,
                head_major: bool = False):
    """Build a step for sequences given as (num_cached, num_new) with shuffled physical blocks.

    Returns (q, k_cache, v_cache, meta, full_q, full_k, full_v): the full per-sequence tensors
    let us compute the dense reference over [0, cached + new)."""
    g = torch.Generator().manual_seed(seed)
    if head_major:   # the engine's layout (kv_cache.py): blocks stored (H, BS, D)
        k_cache = torch.randn(NB, H, BS, D, generator=g).transpose(1, 2)
        v_cache = torch.randn(NB, H, BS, D, generator=g).transpose(1, 2)
    else:
        k_cache = torch.randn(NB, BS, H, D, generator=g)
        v_cache = torch.randn(NB, BS, H, D, generator=g)
    free = torch.randperm(NB, generator=g).tolist()
    MB = max(math.ceil((c + n) / BS) for c, n in seqs)
    block_tables, slots, qs, ks, vs, fulls = [], [], [], [], [], []
    for cached, new in seqs:
        total = cached + new
        blocks = [free.pop() for _ in range(math.ceil(total / BS))]
        block_tables.append(blocks + [0] * (MB - len(blocks)))
        fq, fk, fv = (torch.randn(total, H, D, generator=g) for _ in range(3))
        # Earlier tokens are already in the cache; this step's are written by write_kv.
        for p in range(cached):
            k_cache[blocks[p // BS], p % BS] = fk[p]
            v_cache[blocks[p // BS], p % BS] = fv[p]
        slots += [blocks[p // BS] * BS + p % BS for p in range(cached, total)]
        qs.append(fq[cached:]); ks.append(fk[cached:]); vs.append(fv[cached:])
        fulls.append((fq, fk, fv))
    lens = [n for _, n in seqs]
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor(block_tables, dtype=torch.int32),
        context_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), max_query_len=max(lens),
        max_context_len=max(c + n for c, n in seqs))
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, fulls


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("BS", [1, 4, 16])
@pytest.mark.parametrize("seqs", [
    [(0, 7)],                                  # one fresh prompt
    [(0, 5), (0, 16), (0, 1)],                 # several prompts, one ending exactly on a block
    [(9, 1), (20, 1), (0, 1), (31, 1)],        # decode steps
    [(12, 6), (3, 1), (0, 11), (17, 1)],       # chunked prefill mixed with decodes
])
def test_paged_attention_equals_dense_causal_attention(BS, seqs, head_major):
    """Each sequence's paged output equals dense causal SDPA over its whole history, for
    either memory layout of the blocks."""
    H, D = 3, 16
    q, k, v, kc, vc, meta, fulls = _paged_step(seqs, H, D, BS, NB=64, seed=BS, head_major=head_major)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    out = paged_attention(q, kc, vc, meta, 1 / math.sqrt(D))
    start = 0
    for (cached, new), (fq, fk, fv) in zip(seqs, fulls):
        ref = dense_causal_attention(fq, fk, fv, 1 / math.sqrt(D))[cached:]   # the new queries' rows
        torch.testing.assert_close(out[start:start + new], ref, atol=1e-5, rtol=1e-5)
        start += new


def test_write_kv_writes_only_its_slots_and_skips_padding():
    """write_kv fills exactly the listed slots; slot -1 (graph padding) writes nothing."""
    NB, BS, H, D = 4, 4, 2, 8
    kc, vc = torch.full((NB, BS, H, D), 7.0), torch.full((NB, BS, H, D), 7.0)
    k, v = torch.randn(3, H, D), torch.randn(3, H, D)
    write_kv(k, v, kc, vc, torch.tensor([5, -1, 14]))
    flat_k = kc.view(-1, H, D)
    torch.testing.assert_close(flat_k[5], k[0])
    torch.testing.assert_close(flat_k[14], k[2])
    untouched = [i for i in range(NB * BS) if i not in (5, 14)]
    assert bool((flat_k[untouched] == 7.0).all()) and bool((vc.view(-1, H, D)[untouched] == 7.0).all())


_STEPS = [
    [(9, 1), (20, 1), (0, 1), (31, 1)],        # decode: the case the fast paths tune
    [(12, 6), (3, 1), (0, 11), (17, 1)],       # mixed: they hand it to the reference
]


@pytest.mark.parametrize("seqs", _STEPS)
def test_cpu_decode_attention_equals_the_reference(seqs):
    """cpu_attention.decode_attention (the CPU engine's default) gives the reference's output,
    on the engine's head-major layout, for decode steps and for steps it hands back."""
    q, k, v, kc, vc, meta, _ = _paged_step(seqs, 3, 16, 4, NB=64, seed=7, head_major=True)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    torch.testing.assert_close(cpu_attention.decode_attention(q, kc, vc, meta, 0.25),
                               paged_attention(q, kc, vc, meta, 0.25), atol=1e-5, rtol=1e-5)


def test_fused_decode_form_equals_the_reference():
    """fused_decode_attention (the form torch.compile fuses on CPU) computes the reference's attention."""
    q, k, v, kc, vc, meta, _ = _paged_step(_STEPS[0], 3, 16, 4, NB=64, seed=7, head_major=True)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    blocks = cpu_attention._used_blocks(meta, 4)                        # (S, nb)
    fused = cpu_attention.fused_decode_attention(q, kc.transpose(1, 2), vc.transpose(1, 2), blocks,
                                        meta.context_lens.long(), 0.25)
    torch.testing.assert_close(fused, paged_attention(q, kc, vc, meta, 0.25), atol=1e-5, rtol=1e-5)


def _with_window(meta: AttentionMetadata, seqs: list[tuple[int, int]], W: int, BS: int) -> AttentionMetadata:
    """Set a sliding window on the step and punch holes (-1, as the scheduler leaves them) where
    blocks lie wholly before the window of the sequence's first query, i.e. were evicted."""
    meta.attention_window = W
    for s, (cached, _) in enumerate(seqs):
        meta.block_tables[s, :max(0, (cached - W + 1) // BS)] = -1
    return meta


_WINDOWED = [
    [(0, 13)],                                 # a prompt longer than the window
    [(9, 1), (20, 1), (0, 1), (31, 1)],        # decode steps, three of them past the window
    [(12, 6), (3, 1), (0, 11), (17, 9)],       # chunked prefill mixed with decodes
]


@pytest.mark.parametrize("W", [1, 5, 8])
@pytest.mark.parametrize("seqs", _WINDOWED)
def test_windowed_paged_attention_equals_band_masked_dense_attention(seqs, W):
    """With attention_window W, each query sees only the last W positions (itself included):
    the paged output equals dense SDPA under the same band mask, even with the evicted
    blocks' table entries turned into holes."""
    H, D, BS = 3, 16, 4
    q, k, v, kc, vc, meta, fulls = _paged_step(seqs, H, D, BS, NB=64, seed=W, head_major=True)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    out = paged_attention(q, kc, vc, _with_window(meta, seqs, W, BS), 1 / math.sqrt(D))
    start = 0
    for (cached, new), (fq, fk, fv) in zip(seqs, fulls):
        ref = dense_causal_attention(fq, fk, fv, 1 / math.sqrt(D), window=W)[cached:]
        torch.testing.assert_close(out[start:start + new], ref, atol=1e-5, rtol=1e-5)
        start += new
    wide = dense_causal_attention(fulls[0][0], fulls[0][1], fulls[0][2], 1 / math.sqrt(D))
    assert not torch.allclose(wide[seqs[0][0]:], out[:seqs[0][1]], atol=1e-3), "the window must matter"


@pytest.mark.parametrize("W", [3, 8])
def test_cpu_decode_attention_honours_the_window(W):
    """cpu_attention.decode_attention with a window (and holes for evicted blocks) gives the
    reference's output."""
    seqs = _WINDOWED[1]
    q, k, v, kc, vc, meta, _ = _paged_step(seqs, 3, 16, 4, NB=64, seed=7, head_major=True)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    meta = _with_window(meta, seqs, W, 4)
    torch.testing.assert_close(cpu_attention.decode_attention(q, kc, vc, meta, 0.25),
                               paged_attention(q, kc, vc, meta, 0.25), atol=1e-5, rtol=1e-5)
