"""Triton kernels for the paged KV cache: the GPU fast path of attention.py.

Three kernels, each built around one idea, and a split variant of the second:
  _write_kv_kernel   a scatter: one program per token copies that token's (H, D) K and V rows
                     into its cache slot, or does nothing for a padding token (slot -1).
  _decode_kernel     one query per sequence: one program per (sequence, head) walks the
                     sequence's block table, a BLOCK_N-token tile at a time, with an online softmax.
  _prefill_kernel    many queries per sequence (a prompt, or a chunk of one): flash attention over
                     the block table, one program per (sequence, head, BLOCK_M queries).
  _split_decode_kernel + _split_decode_reduce_kernel
                     split-K decode ("flash decoding"), for small batches on a big GPU: below.
                     Given the step's K/V (new_kv, the fused decode step), the first kernel also
                     does _write_kv_kernel's work for its token and reads that key from registers.

They have the same semantics as attention.write_kv and attention.paged_attention, which the
tests use as the oracle. A sliding window (meta.attention_window) is a runtime argument: each
program starts its key loop at the first tile of its window, so blocks before it (evicted ones
included) are never read; without a window it is 2**30 and changes nothing.
This file does not cover ALiBi or GQA.

Split-K decode. At batch 1 the decode kernel has only S*H programs (25 for GPT-2 XL) for an
H200's 132 SMs, and each walks its whole context one tile after another: the step waits on a
chain of memory round trips while most of the GPU idles. So when S*H is small, we cut each
query's keys into P partitions, one program per (sequence, head, partition). Each runs the same
online softmax over its share of the tiles and stores its running max, sum and unnormalised
weighted V; a second, tiny kernel rescales the P partials to a common max and adds them (the
log-sum-exp trick): the same softmax as one pass, up to rounding. decode_partitions chooses P; for
large batches P = 1 and the one-pass kernel runs alone, without the second launch.
(Flash-Decoding: Dao, Haziza, Massa, Sizov 2023; vLLM's paged_attention_v2 kernel.)

The decode kernels follow two rules so that a CUDA graph can capture them once and replay them
with other context lengths:
  - their grids and constexprs depend only on S, H, D, BS and host-side bounds
    (max_context_len, which is n_ctx in a captured graph, and the window), never on the real
    lengths; P partitions the device-side length, so partitions past a short sequence's end
    just store a neutral partial;
  - they read every length on the device (context_lens, query_start_loc). No kernel here
    synchronises with the host.

N = tokens in this step   S = sequences   H = n_head   D = head_dim   BD = D padded to a power of 2
NB = KV blocks in pool   BS = tokens per block   MB = max blocks per sequence
BLOCK_M = queries per prefill program   BLOCK_N = keys per loop iteration   P = decode partitions

References: FlashAttention-2 (Dao 2023), Triton's fused-attention tutorial,
vLLM PagedAttention (Kwon et al. 2023) and its Triton unified-attention kernel,
Flash-Decoding (Dao et al. 2023, "Flash-Decoding for long-context inference").
"""
# Keep annotations as strings: `tl.constexpr` is then not evaluated at import, so this file
# imports without triton. (Triton reads string annotations the same way.)
from __future__ import annotations

import functools

import torch

from .attention import AttentionMetadata
from .config import cdiv

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs use attention.py; nothing here is launched
    triton = tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634  # we fold log2(e) into the scale: exp2 is one instruction, exp is not
NO_WINDOW = 1 << 30          # the window argument without a sliding window: longer than any context


def _jit(fn=None, **kwargs):
    """triton.jit when triton is installed; otherwise the plain function, never launched."""
    if fn is None:
        return lambda f: _jit(f, **kwargs)
    return triton.jit(fn, **kwargs) if HAS_TRITON else fn


# Triton compiles a separate variant when an int argument is 1 or a multiple of 16. The
# sequence and token counts change every step, so a fresh variant could compile (~1 s) in the
# middle of serving; we ask Triton not to specialise on them.
_DYNAMIC = ["num_seqs", "num_tokens"]


@_jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kn, stride_kh,               # k, v: (N, H, D), same strides
                     stride_cb, stride_cs, stride_ch,    # caches: (NB, BS, H, D), same strides
                     H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token copies all H heads at once: a (BLOCK_H, BLOCK_D) tile of 1-2K elements
    # for GPT-2 is big enough for wide loads and small enough that N programs spread over the SMs.
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n).to(tl.int64)            # int64: NB*BS*H*D may pass 2**31
    block, offset = slot // BS, slot % BS
    h = tl.arange(0, BLOCK_H)[:, None]                   # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]                   # (1, BLOCK_D)
    # A padding token (slot -1) copies zero heads: an all-false mask, so no branch and no
    # out-of-bounds address. (We compare the block against a scalar count rather than `&` a scalar
    # bool into the mask: triton 3.9's interpreter rejects the mask that `&` builds.)
    num_heads = tl.where(slot >= 0, H, 0)
    mask = (h < num_heads) & (d < D)                     # (BLOCK_H, BLOCK_D)
    src = n * stride_kn + h * stride_kh + d              # (BLOCK_H, BLOCK_D)
    dst = block * stride_cb + offset * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


@_jit
def _kv_offsets(block, t, h, d, stride_cb, stride_cs, stride_ch, BS: tl.constexpr):
    # Where key position t of a sequence lives in the pool: block id (from the block table) and
    # offset inside the block, then head h and the d lanes. (BLOCK_N,) -> (BLOCK_N, BD) offsets.
    # int64, because NB*BS*H*D can pass 2**31 elements in a large pool.
    row = block.to(tl.int64) * stride_cb + (t % BS) * stride_cs + h * stride_ch
    return row[:, None] + d[None, :]


@_jit
def _zero_padding_rows(out_ptr, first_row, num_tokens, step, h, stride_on, stride_oh,
                       D: tl.constexpr, BLOCK_D: tl.constexpr):
    # CUDA-graph padding rows (after the last sequence's tokens) get zeros, as in the reference.
    # The attention programs share this work: the program with rank r writes rows first_row + r,
    # + step, ... for its head. No extra memset launch is needed, and a graph with few padding
    # rows pays almost nothing.
    d = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for row in range(first_row, num_tokens, step):
        tl.store(out_ptr + row * stride_on + h * stride_oh + d, zeros, mask=d < D)


@_jit
def _query_row(query_start_loc_ptr, s, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # Sequence s's row in q and out, and the lanes a program reads and writes there: D of them,
    # or none for a "filler" sequence. A filler has no query this step (query_start_loc[s+1] ==
    # query_start_loc[s]): a caller may list one to keep a batch's shape, and it must write no
    # output row. (A count compared with the lanes, not `d_mask & has_query`: see _write_kv_kernel.)
    q_row = tl.load(query_start_loc_ptr + s)
    has_query = tl.load(query_start_loc_ptr + s + 1) > q_row
    d = tl.arange(0, BLOCK_D)                                  # (BD,) the padded lanes are masked off
    return q_row, d < tl.where(has_query, D, 0)


@_jit
def _load_new_kv(k_new_ptr, v_new_ptr, slot_ptr, q_row, h, d_io, stride_kn, stride_kh, BLOCK_D: tl.constexpr):
    # A decode step's own key and value (head h), and its cache slot. The slot is read into
    # every lane under d_io: a sequence with no query this step (its q_row is the next one's,
    # or past the end) reads nothing.
    d = tl.arange(0, BLOCK_D)
    row = q_row * stride_kn + h * stride_kh + d
    k = tl.load(k_new_ptr + row, mask=d_io, other=0.0)        # (BD,) in the cache's dtype
    v = tl.load(v_new_ptr + row, mask=d_io, other=0.0)
    slot = tl.load(slot_ptr + q_row + d * 0, mask=d_io, other=-1).to(tl.int64)    # (BD,) one value
    return k, v, slot


@_jit
def _add_new_key(m_i, l_i, acc, q, k, v, slot, k_cache_ptr, v_cache_ptr, h, part, d_io,
                 stride_cb, stride_cs, stride_ch, BS: tl.constexpr, BLOCK_D: tl.constexpr):
    # The step's own key, taken from registers instead of the cache: this saves the step a
    # write_kv launch per layer (48 of GPT-2 XL's ~445 kernels at batch 1). Partition 0 stores
    # head h's K/V row into the token's slot (none for slot -1, a graph's padding) and adds the
    # key to its softmax state, one more online-softmax update; the other partitions add nothing
    # (a score of -inf). No program reads the slot, so nothing races with the store. This runs
    # after the loop over the cache, so the loads of k and v (issued before it) cost no wait.
    d = tl.arange(0, BLOCK_D)
    first = part == 0
    # (A count compared with the lanes, not a scalar bool `&`-ed into a mask: see _write_kv_kernel.)
    store = d_io & (slot >= 0) & (d < tl.where(first, BLOCK_D, 0))
    dst = (slot // BS) * stride_cb + (slot % BS) * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, k, mask=store)
    tl.store(v_cache_ptr + dst, v, mask=store)
    score = tl.where(first, tl.sum(k.to(tl.float32) * q, axis=0), float("-inf"))
    m_new = tl.maximum(m_i, score)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(score - m_new)                                  # 0 outside partition 0
    return m_new, l_i * alpha + p, acc * alpha + p * v.to(tl.float32)


@_jit
def _attend_partition(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                      query_start_loc_ptr, s, h, part, num_parts, qk_scale, window,
                      stride_qn, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                      k_new_ptr, v_new_ptr, slot_ptr, stride_kn, stride_kh,
                      D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      NEW_KV: tl.constexpr):
    # Sequence s's single query, head h, against partition `part` of the keys it sees, out of
    # `num_parts` (1: all of them). Returns the online softmax's state: the running max m_i and
    # sum l_i of the log2-scaled scores, and acc (BD,), the sum of V weighted by exp2(score - m_i),
    # not yet divided by l_i. One pass divides; split-K first combines it with the other parts'.
    # With NEW_KV, this step's key and value (at position ctx - 1) are not in the cache yet: they
    # come from k_new/v_new (q's rows; their own strides), and partition 0 stores them (_add_new_key).
    q_row, d_io = _query_row(query_start_loc_ptr, s, D, BLOCK_D)
    ctx = tl.load(context_lens_ptr + s)
    d = tl.arange(0, BLOCK_D)                                  # (BD,)
    d_mask = d < D
    q = tl.load(q_ptr + q_row * stride_qn + h * stride_qh + d, mask=d_io, other=0.0)
    q = q.to(tl.float32) * qk_scale                            # (BD,) scale once, not per score

    # The query (at ctx - 1) sees keys lo .. ctx-1; those the loop reads from the cache (all of
    # them, or all but the new one) span the BLOCK_N-token tiles from the one holding lo. Each
    # partition takes an equal run of whole tiles, computed here from the device-side ctx, so
    # every key falls in exactly one partition. A partition past the last tile (a short
    # sequence, or ctx == 0) runs no iteration and returns the state it started from.
    cached = ctx - 1 if NEW_KV else ctx                        # keys before `cached` are in the cache
    lo = tl.maximum(ctx - window, 0)
    lo_tile = (lo // BLOCK_N) * BLOCK_N
    tiles_per_part = tl.cdiv(tl.cdiv(cached - lo_tile, BLOCK_N), num_parts)
    start = lo_tile + part * tiles_per_part * BLOCK_N
    end = tl.minimum(start + tiles_per_part * BLOCK_N, cached)

    # A single query row gives no matrix for tl.dot (it needs M >= 16), so we score the tile with
    # a broadcast multiply and a row sum in fp32. Decode is bound by memory, not compute.
    n = tl.arange(0, BLOCK_N)                                  # (BLOCK_N,)
    bt_row = block_tables_ptr + s * stride_bt
    m_i = tl.full([], -1e30, tl.float32)   # running max; finite, so m_i - m_new is never inf - inf
    l_i = tl.full([], 0.0, tl.float32)     # running softmax denominator
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)                # (BD,) running weighted sum of V
    if NEW_KV:
        k_new, v_new, slot = _load_new_kv(k_new_ptr, v_new_ptr, slot_ptr, q_row, h, d_io, stride_kn, stride_kh,
                                          BLOCK_D)
    # We gather one block id per token (each id repeats BS times, so these loads hit L1). Block ids
    # of tile i+1 are loaded during tile i, leaving one memory round trip per iteration, not two.
    # The masks keep t >= lo: the holes (-1) of evicted blocks before the window are never read.
    t = start + n
    block = tl.load(bt_row + t // BS, mask=(t >= lo) & (t < end), other=0)   # (BLOCK_N,) first tile's ids
    for tile_start in range(start, end, BLOCK_N):
        t = tile_start + n                                     # (BLOCK_N,) key positions
        t_mask = (t >= lo) & (t < end)
        kv = _kv_offsets(block, t, h, d, stride_cb, stride_cs, stride_ch, BS)    # (BLOCK_N, BD)
        kv_mask = t_mask[:, None] & d_mask[None, :]            # (BLOCK_N, BD)
        k = tl.load(k_cache_ptr + kv, mask=kv_mask, other=0.0).to(tl.float32)   # (BLOCK_N, BD)
        v = tl.load(v_cache_ptr + kv, mask=kv_mask, other=0.0).to(tl.float32)   # (BLOCK_N, BD)
        t_next = t + BLOCK_N
        block = tl.load(bt_row + t_next // BS, mask=t_next < end, other=0)

        scores = tl.sum(k * q[None, :], axis=1)                # (BLOCK_N,) log2-scaled logits
        scores = tl.where(t_mask, scores, float("-inf"))
        # Online softmax: rescale what we have so far by exp2(old max - new max).
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)                            # (BLOCK_N,)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)     # (BD,)
        m_i = m_new
    if NEW_KV:
        m_i, l_i, acc = _add_new_key(m_i, l_i, acc, q, k_new, v_new, slot, k_cache_ptr, v_cache_ptr, h, part, d_io,
                                     stride_cb, stride_cs, stride_ch, BS, BLOCK_D)
    return m_i, l_i, acc


@_jit(do_not_specialize=_DYNAMIC)
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
                   block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
                   qk_scale, num_seqs, num_tokens, window,
                   stride_qn, stride_qh, stride_on, stride_oh,
                   stride_cb, stride_cs, stride_ch, stride_bt,
                   D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (s, h) produces one (D,) output row: sequence s's single query against all of its
    # ctx keys for head h. The loop runs over device-side ctx in BLOCK_N-token tiles (several cache
    # blocks each), so one compiled kernel serves every context length.
    s = tl.program_id(0)
    h = tl.program_id(1)
    m_i, l_i, acc = _attend_partition(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                                      query_start_loc_ptr, s, h, 0, 1, qk_scale, window,
                                      stride_qn, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                                      q_ptr, q_ptr, context_lens_ptr, 0, 0,       # no new_kv: never read
                                      D, BS, BLOCK_N, BLOCK_D, False)
    out = acc / tl.where(l_i > 0, l_i, 1.0)                    # ctx == 0 gives zeros, not NaN
    q_row, d_io = _query_row(query_start_loc_ptr, s, D, BLOCK_D)
    d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + q_row * stride_on + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d_io)
    first_pad = tl.load(query_start_loc_ptr + num_seqs)
    _zero_padding_rows(out_ptr, first_pad + s, num_tokens, num_seqs, h, stride_on, stride_oh, D, BLOCK_D)


@_jit(do_not_specialize=_DYNAMIC)
def _split_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
                         block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
                         qk_scale, num_seqs, num_tokens, window,
                         stride_qn, stride_qh, stride_on, stride_oh,
                         stride_cb, stride_cs, stride_ch, stride_bt,
                         k_new_ptr, v_new_ptr, slot_ptr, stride_kn, stride_kh,
                         part_max_ptr, part_sum_ptr, part_acc_ptr,
                         D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NEW_KV: tl.constexpr):
    # Split-K, first pass. Program (s, h, p) runs the decode loop over partition p of sequence s's
    # keys and stores its unnormalised state: part_max and part_sum (S, H, P), part_acc (S, H, P, D),
    # all fp32. _split_decode_reduce_kernel then combines the P partials of each (s, h).
    s = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    P = tl.num_programs(2)
    m_i, l_i, acc = _attend_partition(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                                      query_start_loc_ptr, s, h, p, P, qk_scale, window,
                                      stride_qn, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                                      k_new_ptr, v_new_ptr, slot_ptr, stride_kn, stride_kh,
                                      D, BS, BLOCK_N, BLOCK_D, NEW_KV)
    i = (s * tl.num_programs(1) + h) * P + p                   # this program's partial, row-major
    d = tl.arange(0, BLOCK_D)
    tl.store(part_max_ptr + i, m_i)
    tl.store(part_sum_ptr + i, l_i)
    tl.store(part_acc_ptr + i * D + d, acc, mask=d < D)
    # The reduce writes only real rows; the padding rows are shared out among these S*P programs.
    first_pad = tl.load(query_start_loc_ptr + num_seqs)
    _zero_padding_rows(out_ptr, first_pad + s * P + p, num_tokens, num_seqs * P, h, stride_on, stride_oh,
                       D, BLOCK_D)


@_jit(do_not_specialize=["num_partitions"])
def _split_decode_reduce_kernel(out_ptr, query_start_loc_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
                                num_partitions, stride_on, stride_oh,
                                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    # Split-K, second pass. Program (s, h) merges the P partials of its row with the log-sum-exp
    # trick: partition i holds sums scaled by exp2(-m_i); rescaled to the largest max M they add
    # up to the one-pass sums, out = sum_i acc_i * exp2(m_i - M) / sum_i l_i * exp2(m_i - M).
    # A neutral partial (m_i = -1e30, l_i = 0, acc_i = 0) adds nothing, and a row whose partials
    # are all neutral (ctx == 0) gives zeros, as in one pass. No exp2 here sees inf - inf.
    s = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)                                  # (BLOCK_P,) BLOCK_P >= num_partitions
    p_mask = p < num_partitions
    i = (s * tl.num_programs(1) + h) * num_partitions + p      # (BLOCK_P,) partial indices
    d = tl.arange(0, BLOCK_D)
    m = tl.load(part_max_ptr + i, mask=p_mask, other=-1e30)    # (BLOCK_P,)
    l = tl.load(part_sum_ptr + i, mask=p_mask, other=0.0)      # (BLOCK_P,)
    acc = tl.load(part_acc_ptr + i[:, None] * D + d[None, :],
                  mask=p_mask[:, None] & (d < D)[None, :], other=0.0)   # (BLOCK_P, BD)
    scale = tl.exp2(m - tl.max(m, axis=0))                     # (BLOCK_P,) in (0, 1]
    l_all = tl.sum(l * scale, axis=0)
    out = tl.sum(acc * scale[:, None], axis=0) / tl.where(l_all > 0, l_all, 1.0)   # (BD,)
    q_row, d_io = _query_row(query_start_loc_ptr, s, D, BLOCK_D)
    tl.store(out_ptr + q_row * stride_on + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d_io)


@_jit(do_not_specialize=_DYNAMIC)
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
                    block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
                    qk_scale, num_seqs, num_tokens, window,
                    stride_qn, stride_qh, stride_on, stride_oh,
                    stride_cb, stride_cs, stride_ch, stride_bt,
                    D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Program (s, h, mb) produces the output rows of queries [mb*BLOCK_M, (mb+1)*BLOCK_M) of
    # sequence s, for head h. It is flash attention: a (BLOCK_M, BD) Q tile stays in registers while
    # (BLOCK_N, BD) K and V tiles stream past. The K/V tiles are gathered through the block table
    # rather than read from one contiguous tensor. Keys of earlier chunks are already in the cache,
    # so a chunk needs nothing beyond what a whole prompt needs.
    s = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    ctx = tl.load(context_lens_ptr + s)
    j = mb * BLOCK_M + tl.arange(0, BLOCK_M)                   # (BLOCK_M,) query index in sequence
    j_mask = j < q_len
    q_pos = ctx - q_len + j                                    # (BLOCK_M,) absolute positions
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q_mask = j_mask[:, None] & d_mask[None, :]                 # (BLOCK_M, BD)
    # Q stays in its input dtype so that tl.dot runs on tensor cores. Scores come out in fp32.
    q = tl.load(q_ptr + (q_start + j)[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=q_mask, other=0.0)                        # (BLOCK_M, BD)

    # Causality bounds the loop: no row of this tile sees past its last query's position. A tile
    # past the end of a short sequence (the grid is sized for the longest) does no iterations.
    last_pos = ctx - q_len + tl.minimum((mb + 1) * BLOCK_M, q_len) - 1
    hi = tl.where(mb * BLOCK_M < q_len, last_pos + 1, 0)

    n = tl.arange(0, BLOCK_N)
    bt_row = block_tables_ptr + s * stride_bt
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)   # finite, so a fully masked tile gives no NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)       # (BLOCK_M, BD)
    # The window bounds it from below: the tile's first query sees keys from lo on.
    lo = tl.maximum(ctx - q_len + mb * BLOCK_M - window + 1, 0)
    lo_tile = (lo // BLOCK_N) * BLOCK_N
    t = lo_tile + n
    block = tl.load(bt_row + t // BS, mask=(t >= lo) & (t < hi), other=0)   # prefetched, as in decode
    for start in range(lo_tile, hi, BLOCK_N):
        t = start + n                                          # (BLOCK_N,) key positions
        kv = _kv_offsets(block, t, h, d, stride_cb, stride_cs, stride_ch, BS)    # (BLOCK_N, BD)
        kv_mask = ((t >= lo) & (t < hi))[:, None] & d_mask[None, :]   # (BLOCK_N, BD)
        # other=0 matters: a masked key gets p = 0, but 0 * NaN is NaN, so V must be defined.
        k = tl.load(k_cache_ptr + kv, mask=kv_mask, other=0.0)    # (BLOCK_N, BD)
        v = tl.load(v_cache_ptr + kv, mask=kv_mask, other=0.0)    # (BLOCK_N, BD)
        t_next = t + BLOCK_N
        block = tl.load(bt_row + t_next // BS, mask=t_next < hi, other=0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale   # (BLOCK_M, BLOCK_N)
        # Key t is visible to query j when q_pos[j] - window < t <= q_pos[j]. That also hides
        # t >= ctx for real rows.
        visible = (t[None, :] <= q_pos[:, None]) & (t[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))        # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])                   # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # tl.dot wants one dtype for both operands: we round p to V's (fp16/bf16), as FA2 does.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]           # (BLOCK_M, BD)
    tl.store(out_ptr + (q_start + j)[:, None] * stride_on + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
    num_mb = tl.num_programs(2)
    first_pad = tl.load(query_start_loc_ptr + num_seqs)
    _zero_padding_rows(out_ptr, first_pad + s * num_mb + mb, num_tokens, num_seqs * num_mb, h,
                       stride_on, stride_oh, D, BLOCK_D)


def _check_inputs(x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("nanoserve.kernels needs triton; pip install 'nanoserve[gpu]', "
                           "or use the torch path in nanoserve.attention")
    assert x.stride(-1) == 1 and k_cache.stride(-1) == 1, "kernels need head_dim contiguous"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must share a layout"


def _block_d(D: int) -> int:
    # tl.arange needs a power of two and tl.dot needs K >= 16, so we pad head_dim (80 -> 128).
    return max(16, triton.next_power_of_2(D))


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each token's K/V at its slot.  k, v: (N, H, D) -> k_cache, v_cache: (NB, BS, H, D).

    Same as attention.write_kv: tokens with slot -1 are skipped, and no other slot is touched."""
    _check_inputs(k, k_cache, v_cache)
    assert k.shape == v.shape and k.stride() == v.stride(), "k and v must share a layout"
    N, H, D = k.shape
    if N == 0:
        return
    _write_kv_kernel[(N,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=H, D=D, BS=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), num_warps=4)


# Split-K decode. The grid is (S, H, P), with P chosen on the host from values a CUDA graph fixes
# (S, H, the SM count, max_context_len: n_ctx under graphs), never from the real lengths.
MAX_PARTITIONS = 32      # static bound on P: the reduce kernel's tile is this wide (one compiled variant)
PROGRAMS_PER_SM = 4      # split until about this many decode programs per SM: 4 warps each, so 16
                         # of an SM's 64 warp slots; a latency-bound loop wants many in flight
INTERPRETER_SMS = 4      # "SMs" of a CPU running Triton's interpreter: small, so tiny test batches split


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count   # a host query, no sync


def decode_partitions(num_seqs: int, num_heads: int, max_context_len: int, window: int | None,
                      block_n: int, num_sms: int) -> int:
    """How many partitions split-K decode cuts each query's keys into; 1 means one pass.

    The rule: split into enough partitions for about PROGRAMS_PER_SM programs per SM, when
    that means at least 2 (S*H <= PROGRAMS_PER_SM * num_sms / 2), but no more than the BLOCK_N
    tiles a query can see (the longest context, or the window, which may straddle one extra
    tile), and at most MAX_PARTITIONS. One tile of keys (max_context_len <= block_n) never
    splits. Every input is known on the host, so the choice never waits on the GPU.
    Measured on an H200 (BENCHMARKS.md): GPT-2 XL at batch 8 (200 programs, more than the 132
    SMs) still ran 2.4x faster at 1,024 tokens split in 4-8, and lost 1.3 us a call at 64.
    """
    programs = num_seqs * num_heads
    max_tiles = cdiv(max_context_len, block_n)
    if window is not None:
        max_tiles = min(max_tiles, cdiv(window - 1, block_n) + 1)   # W keys from any offset
    if 2 * programs > PROGRAMS_PER_SM * num_sms or max_tiles < 2:
        return 1
    return min(max_tiles, cdiv(PROGRAMS_PER_SM * num_sms, programs), MAX_PARTITIONS)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, *, num_partitions: int | None = None,
                    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached keys (see attention.py).

    Args:
        q: (N, H, D) this step's queries, sequences back to back (meta.query_start_loc).
        k_cache, v_cache: (NB, BS, H, D) the pool, already holding this step's K/V (unless
            new_kv is given).
        meta: the step's layout; only max_query_len and max_context_len (a bound) are read on
            the host.
        scale: usually 1/sqrt(D).
        num_partitions: decode steps only: split each query's keys into this many partitions
            (1: the one-pass kernel); None lets decode_partitions choose.
        new_kv: decode steps only: this step's (k, v), (N, H, D) each, not yet in the cache,
            to be stored at meta.slot_mapping as write_kv would. Split-K decode does it inside
            its first kernel and attends to them from registers (one launch less); the one-pass
            kernel, measured faster without, runs write_kv first.
    Returns:
        (N, H, D) in q's dtype. Rows past query_start_loc[-1] (padding tokens) are zeros.
    """
    _check_inputs(q, k_cache, v_cache)
    assert q.dtype == k_cache.dtype, f"q is {q.dtype} but the cache is {k_cache.dtype}"
    if num_partitions is not None and not 1 <= num_partitions <= MAX_PARTITIONS:
        raise ValueError(f"num_partitions={num_partitions} must be between 1 and {MAX_PARTITIONS}; "
                         "pass None to let paged_attention choose")
    N, H, D = q.shape
    S, BS = meta.num_seqs, k_cache.shape[1]
    out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)   # (N, H, D) every row gets written
    if N == 0:
        return out
    if S == 0 or meta.max_query_len == 0:                           # nothing but padding rows
        return out.zero_()
    if new_kv is not None:
        assert meta.is_decode, "new_kv: decode steps only (a prefill's keys see each other)"
        k, v = new_kv
        assert k.shape == v.shape == q.shape and k.stride() == v.stride() and k.dtype == v.dtype == q.dtype \
            and k.stride(-1) == 1, "new_kv's k and v must have q's shape and dtype, and one layout"
    BLOCK_D = _block_d(D)
    args = (q, k_cache, v_cache, out, meta.block_tables, meta.context_lens, meta.query_start_loc,
            scale * LOG2E, S, N, meta.attention_window or NO_WINDOW,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0))
    if meta.is_decode:
        # 64 keys per iteration (4 GPT-2 blocks). With D padded to 128 we halve the tile to keep
        # registers in check. The one-pass kernel runs on 2 warps: at GPT-2's batch 256 (mixed
        # contexts, an H200) a step's 12 calls took 1.24 ms on 2 warps, 1.68 on 4 and 2.27 on 8,
        # with num_stages making no difference (docs/bench/2026-11-30-h200-s3/decode_attn_bench.py):
        # more, smaller programs per SM keep more K/V loads in flight.
        BLOCK_N = max(BS, 64 if BLOCK_D <= 64 else 32)
        P = num_partitions or decode_partitions(S, H, meta.max_context_len, meta.attention_window, BLOCK_N,
                                                _num_sms(q.device))
        if P == 1:
            if new_kv is not None:
                # The one-pass kernel is faster without the write in it: at GPT-2's batch 256
                # (an H200) a step's attention took 1.27 ms with write_kv launched before it
                # and 1.49 ms with the write inside (docs/bench/2026-11-30-h200-s4/new_kv_bench.py).
                write_kv(*new_kv, k_cache, v_cache, meta.slot_mapping)
            _decode_kernel[(S, H)](*args, D=D, BS=BS, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=2)
            return out
        # Split-K takes the write (at XL's batch 1 it saved 0.65-1.9 us a layer, new_kv_bench.py).
        k_new, v_new = new_kv or (q, q)                  # without new_kv, never read
        args += (k_new, v_new, meta.slot_mapping, k_new.stride(0), k_new.stride(1))
        consts = dict(D=D, BS=BS, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, NEW_KV=new_kv is not None)
        # Per-call scratch: inside a CUDA graph, the graph's memory pool holds it.
        part_max = torch.empty((S, H, P), dtype=torch.float32, device=q.device)     # (S, H, P)
        part_sum = torch.empty((S, H, P), dtype=torch.float32, device=q.device)     # (S, H, P)
        part_acc = torch.empty((S, H, P, D), dtype=torch.float32, device=q.device)  # (S, H, P, D)
        _split_decode_kernel[(S, H, P)](*args, part_max, part_sum, part_acc, **consts, num_warps=4)
        _split_decode_reduce_kernel[(S, H)](out, meta.query_start_loc, part_max, part_sum, part_acc,
                                            P, out.stride(0), out.stride(1),
                                            D=D, BLOCK_D=BLOCK_D, BLOCK_P=MAX_PARTITIONS, num_warps=1)
    else:
        if q.dtype == torch.float32:
            # tl.dot on fp32 defaults to TF32 (10-bit mantissa), far from the torch reference,
            # so fp32 (the test dtype) uses exact FMA dots. Those need many registers: with
            # 32x32 tiles on 8 warps they stay below the limit instead of spilling to local memory.
            BLOCK_M, BLOCK_N, num_warps, precision = 32, 32, 8, "ieee"
        else:
            # fp16/bf16 (serving): wgmma tensor-core dots that multiply the fp16/bf16 inputs
            # exactly and accumulate in fp32. input_precision only changes how fp32 inputs
            # are rounded, so here it is moot; we pass Triton's default ("tf32") unchanged.
            # This is ~150 registers with D = 64.
            BLOCK_M, BLOCK_N, num_warps, precision = 64, (64 if BLOCK_D <= 64 else 32), 4, "tf32"
        grid = (S, H, triton.cdiv(meta.max_query_len, BLOCK_M))
        _prefill_kernel[grid](*args, D=D, BS=BS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                              DOT_PRECISION=precision, num_warps=num_warps)
    return out
