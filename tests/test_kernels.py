"""The Triton kernels must agree with the PyTorch reference in attention.py.

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), so the
shapes are small. The same tests run compiled on a GPU. Every case draws fresh random tensors
(seeded from its test id), puts sequences in randomly permuted physical blocks, and takes q, k, v
as strided views of one fused qkv tensor, the way model.py produces them.

N = tokens in step   S = sequences   H = heads   D = head_dim   NB = blocks in pool   BS = block size
"""
import math
import os
import zlib

import pytest
import torch

pytest.importorskip("triton")

from nanoserve import attention as ref  # noqa: E402
from nanoserve import kernels  # noqa: E402
from nanoserve.attention import AttentionMetadata  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# fp32 is checked tightly. fp16/bf16 round P to 16 bits before P@V, as flash attention does.
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _seed_and_poison_empty(request, monkeypatch):
    """Seed each case differently, and make torch.empty return NaNs: an output row that a
    kernel forgets to write then fails the comparison instead of passing by luck."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    real_empty = torch.empty

    def nan_empty(*args, **kwargs) -> torch.Tensor:
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)


def _make_step(seqs: list[tuple[int, int]], *, H: int, D: int, BS: int, dtype: torch.dtype,
               num_padding: int = 0) -> tuple:
    """Build one step for sequences given as (num_cached, num_new) token counts.

    The pool holds random K/V in every slot, including the earlier chunks' keys. Physical blocks
    are a random permutation, so no block table is contiguous. This step's K/V are NOT written yet.
    Returns q, k, v (N, H, D) views, k_cache, v_cache (NB, BS, H, D), meta.
    """
    ctx_lens = [c + n for c, n in seqs]
    blocks_per_seq = [math.ceil(c / BS) for c in ctx_lens]
    NB = sum(blocks_per_seq) + 3                                   # a few blocks nobody owns
    perm = torch.randperm(NB).to(torch.int32)                      # (NB,)
    block_tables = torch.zeros(len(seqs), max(max(blocks_per_seq), 1), dtype=torch.int32)  # (S, MB)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        block_tables[s, :nb] = perm[used:used + nb]
        used += nb
    slots = [int(block_tables[s, p // BS]) * BS + p % BS
             for s, (c, n) in enumerate(seqs) for p in range(c, c + n)] + [-1] * num_padding
    N = len(slots)
    qkv = torch.randn(N, 3, H, D, dtype=dtype, device=DEVICE)     # fused, like model.py's c_attn
    q, k, v = qkv.unbind(1)                                        # 3 x (N, H, D), strided
    # The engine's layout (kv_cache.py): indexed (NB, BS, H, D), stored head-major (NB, H, BS, D).
    k_cache = torch.randn(NB, H, BS, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    v_cache = torch.randn(NB, H, BS, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    q_lens = [n for _, n in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(),
                                     dtype=torch.int32, device=DEVICE),
        max_query_len=max(q_lens), max_context_len=max(ctx_lens))
    return q, k, v, k_cache, v_cache, meta


def _check_attention(seqs: list[tuple[int, int]], *, H: int, D: int, BS: int,
                     dtype: torch.dtype, num_padding: int = 0, window: int | None = None,
                     num_partitions: int | None = None, max_context_len: int | None = None,
                     new_kv: bool = False) -> None:
    """Write this step's K/V, then compare the kernel's attention with the reference's.
    num_partitions goes to kernels.paged_attention; max_context_len replaces the step's own
    (a bound, as a CUDA graph's n_ctx is). With new_kv the kernel gets this step's K/V and
    writes them itself: then the caches must also come out exactly as write_kv leaves them.

    We compute the reference in fp32 from the same (rounded) inputs, so the comparison measures
    only the kernel's own error. With a window, blocks wholly before a sequence's first query's
    window become holes (-1) in its block table, as eviction leaves them."""
    q, k, v, k_cache, v_cache, meta = _make_step(seqs, H=H, D=D, BS=BS, dtype=dtype,
                                                 num_padding=num_padding)
    if max_context_len is not None:
        meta.max_context_len = max_context_len
    if window is not None:
        meta.attention_window = window
        for s, (cached, _) in enumerate(seqs):
            meta.block_tables[s, :max(0, (cached - window + 1) // BS)] = -1
    scale = 1.0 / math.sqrt(D)
    if new_kv:
        want_k, want_v = k_cache.clone(), v_cache.clone()
        ref.write_kv(k, v, want_k, want_v, meta.slot_mapping)
        got = kernels.paged_attention(q, k_cache, v_cache, meta, scale, num_partitions=num_partitions,
                                      new_kv=(k, v))                                      # (N, H, D)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    else:
        ref.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        got = kernels.paged_attention(q, k_cache, v_cache, meta, scale, num_partitions=num_partitions)  # (N, H, D)
    want = ref.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


SHAPES = [(64, 16), (64, 32), (80, 16), (80, 32), (48, 16), (16, 32)]   # (D, BS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H, D, BS", [(3, 64, 16), (3, 80, 32), (2, 16, 16)])
def test_write_kv_writes_exactly_the_slots_of_real_tokens(H: int, D: int, BS: int,
                                                          dtype: torch.dtype) -> None:
    """Each token's K/V lands in its slot. Padding tokens (slot -1) and all other slots stay untouched."""
    _, k, v, k_cache, v_cache, meta = _make_step([(5, 7), (0, 20), (30, 1)], H=H, D=D, BS=BS,
                                                 dtype=dtype, num_padding=3)
    k_cache.fill_(777.0)                                           # poison: any stray write shows
    v_cache.fill_(-777.0)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.write_kv(k, v, want_k, want_v, meta.slot_mapping)
    kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("new_kv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D, BS", SHAPES)
def test_decode_matches_reference(D: int, BS: int, dtype: torch.dtype, new_kv: bool) -> None:
    """One query per sequence, through the one-pass kernel (num_partitions=1; on a GPU the
    automatic rule would split a batch this small). Contexts end mid-block, on a block edge, and
    past one BLOCK_N tile. With new_kv the kernel also writes the step's K/V (fused.py's way)."""
    seqs = [(0, 1), (16, 1), (2 * BS - 1, 1), (3 * BS + 4, 1), (69, 1)]
    _check_attention(seqs, H=2, D=D, BS=BS, dtype=dtype, num_padding=2, num_partitions=1, new_kv=new_kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D, BS", SHAPES)
def test_mixed_prefill_batch_matches_reference(D: int, BS: int, dtype: torch.dtype) -> None:
    """A fresh prompt that spans two BLOCK_M query tiles, a chunk whose earlier chunks are in the
    cache, a decode token, and a short prompt, all in one step with padding tokens."""
    seqs = [(0, 70), (45, 20), (33, 1), (0, 5)]
    _check_attention(seqs, H=2, D=D, BS=BS, dtype=dtype, num_padding=3)


@pytest.mark.parametrize("decode", [True, False])
def test_bf16_matches_reference(decode: bool) -> None:
    """bf16 inputs go through the same kernels, with fp32 accumulation."""
    if INTERPRETED and not decode:
        pytest.skip("Triton's interpreter (3.6-3.9) multiplies the raw bits of bf16 in tl.dot")
    seqs = [(20, 1), (50, 1)] if decode else [(20, 13), (0, 40)]
    _check_attention(seqs, H=2, D=64, BS=16, dtype=torch.bfloat16, num_padding=1)


@pytest.mark.parametrize("decode, new_kv", [(True, False), (True, True), (False, False)])
def test_filler_sequences_and_padding_tokens_get_zeros(decode: bool, new_kv: bool) -> None:
    """Rows after the last sequence's tokens (CUDA-graph padding) come out as zeros, as in the
    reference. A sequence with no queries this step (an empty filler, or one with context but
    no new tokens) writes no row, so it cannot overwrite the padding rows (nor, with new_kv,
    any cache slot)."""
    first = (10, 1) if decode else (10, 6)
    _check_attention([first, (0, 0), (5, 0)], H=2, D=64, BS=16, dtype=torch.float32,
                     num_padding=4, num_partitions=1 if decode else None, new_kv=new_kv)


def _feed_in_chunks(chunks: list[tuple[int, int]], blocks: list[int], window: int | None = None) -> torch.Tensor:
    """Feed one sequence's tokens as the given (start, end) steps through write_kv and
    paged_attention of kernels.py only, and compare with dense attention over all of them
    (band-masked with a window). With a window, blocks that no later query sees become holes
    (-1) in the block table after each step, as the scheduler's eviction leaves them."""
    H, D, BS, T = 2, 48, 16, chunks[-1][1]
    q, k, v = torch.randn(3, T, H, D, device=DEVICE).unbind(0)    # 3 x (T, H, D)
    k_cache = torch.randn(8, BS, H, D, device=DEVICE)              # (NB, BS, H, D) stale junk
    v_cache = torch.randn(8, BS, H, D, device=DEVICE)
    block_table = torch.tensor([blocks], dtype=torch.int32, device=DEVICE)   # (1, MB)
    ids = block_table.clone()                                      # slots stay known after eviction
    outs = []
    for start, end in chunks:
        pos = torch.arange(start, end, device=DEVICE)
        meta = AttentionMetadata(
            slot_mapping=ids[0, pos // BS].long() * BS + pos % BS,
            block_tables=block_table,
            context_lens=torch.tensor([end], dtype=torch.int32, device=DEVICE),
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=DEVICE),
            max_query_len=end - start, max_context_len=end, attention_window=window)
        kernels.write_kv(k[start:end], v[start:end], k_cache, v_cache, meta.slot_mapping)
        outs.append(kernels.paged_attention(q[start:end], k_cache, v_cache, meta, D ** -0.5))
        if window is not None:
            block_table[0, :max(0, (end - window + 1) // BS)] = -1
    want = ref.dense_causal_attention(q, k, v, D ** -0.5, window=window)   # (T, H, D)
    torch.testing.assert_close(torch.cat(outs), want, atol=1e-4, rtol=1e-4)
    return block_table                                              # (1, MB) with its holes


def test_chunked_prefill_then_decode_matches_dense_causal_attention() -> None:
    """A sequence fed as chunks (16 + 24 tokens) then 3 decode steps, through write_kv and
    paged_attention of kernels.py only, gives dense causal attention over all 43 tokens."""
    _feed_in_chunks([(0, 16), (16, 40), (40, 41), (41, 42), (42, 43)], [5, 2, 7])


@pytest.mark.parametrize("window", [1, 20, 64])
@pytest.mark.parametrize("D, BS", [(64, 16), (48, 16), (16, 32)])
def test_windowed_decode_matches_reference(D: int, BS: int, window: int) -> None:
    """With a sliding window, the one-pass decode kernel sees only each query's last `window` keys
    (the reference's band mask) and never reads the holes of evicted blocks."""
    seqs = [(0, 1), (16, 1), (2 * BS - 1, 1), (3 * BS + 4, 1), (150, 1)]
    _check_attention(seqs, H=2, D=D, BS=BS, dtype=torch.float32, num_padding=2, window=window,
                     num_partitions=1)


@pytest.mark.parametrize("window", [1, 20, 64])
@pytest.mark.parametrize("D, BS", [(64, 16), (48, 16), (16, 32)])
def test_windowed_prefill_matches_reference(D: int, BS: int, window: int) -> None:
    """The prefill kernel with a window: a prompt spanning query tiles, chunks with earlier
    chunks cached (and evicted), a decode token, a short prompt, all in one step."""
    seqs = [(0, 70), (45, 20), (100, 37), (33, 1), (0, 5)]
    _check_attention(seqs, H=2, D=D, BS=BS, dtype=torch.float32, num_padding=3, window=window)


def test_windowed_chunked_prefill_then_decode_matches_band_masked_dense_attention() -> None:
    """A sequence fed in chunks then decoded, with a window of 20 and its evicted blocks turned
    into holes (-1) after each step, through kernels.py only, gives dense attention under the
    same band mask."""
    table = _feed_in_chunks([(0, 16), (16, 40), (40, 72), (72, 73), (73, 74), (74, 75)], [5, 2, 7, 0, 3], window=20)
    assert table[0].tolist()[:3] == [-1, -1, -1], "the test should read past evicted blocks"


# Split-K decode. These contexts (1, 17, 32, 53 and 151 tokens: mid-block and on a block edge)
# span 1 to 3 tiles of BLOCK_N = 64 keys (D <= 64), or 1 to 5 tiles of 32 (D = 80). So the
# 151-token context splits into busy partitions of unequal size (5 tiles in 3 partitions: 2, 2, 1)
# and every short one leaves partitions with no keys at all.
SPLIT_SEQS = [(0, 1), (16, 1), (31, 1), (52, 1), (150, 1)]


@pytest.fixture
def _no_one_pass_decode(monkeypatch):
    """Take the one-pass decode kernel away, so a test that passes ran the split-K path."""
    monkeypatch.setattr(kernels, "_decode_kernel", None)


@pytest.mark.parametrize("new_kv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D, BS, num_partitions", [(64, 16, 4), (80, 32, 3), (16, 32, 2)])
def test_split_decode_matches_reference(D: int, BS: int, num_partitions: int, dtype: torch.dtype, new_kv: bool,
                                        _no_one_pass_decode) -> None:
    """Split-K decode equals the reference for contexts of 1 token, mid-block and past several
    tiles, including partitions that get no keys because the sequence is shorter than P tiles;
    with new_kv, partition 0 also writes the step's K/V and the others never see them."""
    _check_attention(SPLIT_SEQS, H=2, D=D, BS=BS, dtype=dtype, num_padding=2, num_partitions=num_partitions,
                     new_kv=new_kv)


def test_split_decode_with_more_partitions_than_tiles_matches_reference(_no_one_pass_decode) -> None:
    """With P = MAX_PARTITIONS, every sequence has more partitions than tiles (most partials are
    neutral), and the reduce still gives the reference, with no NaN."""
    _check_attention(SPLIT_SEQS, H=2, D=64, BS=16, dtype=torch.float32,
                     num_partitions=kernels.MAX_PARTITIONS)


@pytest.mark.parametrize("new_kv", [False, True])
@pytest.mark.parametrize("window", [1, 20, 53, 151, 500])
@pytest.mark.parametrize("D, BS", [(64, 16), (80, 32)])
def test_windowed_split_decode_matches_reference(D: int, BS: int, window: int, new_kv: bool,
                                                 _no_one_pass_decode) -> None:
    """With a sliding window smaller than, equal to and larger than the contexts, split-K decode
    sees only each query's last `window` keys, like the one-pass kernel and the reference, and
    never reads the holes (-1) of evicted blocks (also when it writes the step's K/V itself)."""
    _check_attention(SPLIT_SEQS, H=2, D=D, BS=BS, dtype=torch.float32, num_padding=2, window=window,
                     num_partitions=3, new_kv=new_kv)


@pytest.mark.parametrize("new_kv", [False, True])
def test_split_decode_of_filler_sequences_and_padding_tokens_gives_zeros(new_kv: bool, _no_one_pass_decode) -> None:
    """Under split-K, CUDA-graph padding rows come out as zeros and sequences with no query this
    step (one with no context at all among them) write no row, and with new_kv no cache slot."""
    _check_attention([(70, 1), (0, 0), (5, 0)], H=2, D=64, BS=16, dtype=torch.float32, num_padding=5,
                     num_partitions=3, new_kv=new_kv)


def test_split_decode_is_chosen_for_a_small_batch_under_a_context_bound(_no_one_pass_decode) -> None:
    """Without num_partitions, a batch of S*H programs below the SM count (INTERPRETER_SMS on a
    CPU) takes the split path, sized by the host-side bound max_context_len (n_ctx in a CUDA
    graph) while the real contexts are far shorter, and still matches the reference."""
    assert kernels.decode_partitions(1, 2, 1024, None, 64, kernels.INTERPRETER_SMS) > 1
    _check_attention([(150, 1)], H=2, D=64, BS=16, dtype=torch.float32, num_padding=1,
                     max_context_len=1024)


def test_decode_partitions_split_only_small_batches_within_the_tiles_a_query_sees() -> None:
    """The rule: one pass once S*H programs leave no room for 2 partitions at PROGRAMS_PER_SM
    programs per SM, or the keys fit one tile; otherwise about PROGRAMS_PER_SM programs per
    SM, capped by the context's (or window's) tiles and MAX_PARTITIONS."""
    rule = kernels.decode_partitions
    assert rule(8, 25, 1024, None, 64, 132) == 3                    # 200 programs: ceil(528 / 200)
    assert rule(16, 25, 1024, None, 64, 132) == 1                   # 400 programs: not 2 per 528
    assert rule(22, 12, 1024, None, 64, 132) == 2                   # 264 programs: exactly 2
    assert rule(1, 25, 64, None, 64, 132) == 1                      # one tile of keys
    assert rule(1, 25, 1024, None, 64, 132) == 16                   # GPT-2 XL, batch 1: all 16 tiles
    assert rule(4, 25, 1024, None, 64, 132) == 6                    # 100 programs: ceil(528 / 100)
    assert rule(1, 25, 1024, 100, 64, 132) == 3                     # a 100-key window spans <= 3 tiles
    assert rule(1, 25, 1024, 1, 64, 132) == 1                       # a 1-key window, one tile
    assert rule(1, 1, 1 << 20, None, 64, 1024) == kernels.MAX_PARTITIONS


def test_num_partitions_out_of_range_is_rejected() -> None:
    """num_partitions outside 1..MAX_PARTITIONS raises ValueError naming the limit."""
    q, _, _, k_cache, v_cache, meta = _make_step([(10, 1)], H=2, D=16, BS=16, dtype=torch.float32)
    for bad in (0, kernels.MAX_PARTITIONS + 1):
        with pytest.raises(ValueError, match=f"between 1 and {kernels.MAX_PARTITIONS}"):
            kernels.paged_attention(q, k_cache, v_cache, meta, 0.25, num_partitions=bad)
