"""The scheduler's policy, on plain Sequence objects (no model)."""
from __future__ import annotations

from nanoserve.kv_cache import BlockAllocator
from nanoserve.scheduler import Scheduler
from nanoserve.sequence import SamplingParams, Sequence, SequenceStatus

_ids = iter(range(10_000))


def _make_scheduler(num_blocks: int = 16, block_size: int = 4, max_num_seqs: int = 8,
                    budget: int = 32, prefix_caching: bool = False) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), block_size, max_num_seqs, budget,
                     enable_prefix_caching=prefix_caching)


def _seq(prompt_len: int, priority: int = 0, prompt: list[int] | None = None,
         params: SamplingParams | None = None) -> Sequence:
    i = next(_ids)
    return Sequence(seq_id=i, request_id=str(i), index=0, prompt_token_ids=prompt or [1] * prompt_len,
                    params=params or SamplingParams(max_tokens=8), priority=priority, arrival_order=i)


def _run_step(sched: Scheduler) -> dict[int, int]:
    """Schedule, then pretend the model ran: advance counters, append a token when sampled."""
    out = sched.schedule()
    for seq, n in out.scheduled:
        sched.computed(seq, n)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(0)
    return {seq.seq_id: n for seq, n in out.scheduled}


def test_long_prompt_is_chunked_under_the_token_budget():
    """A 20-token prompt with an 8-token budget runs as chunks 8, 8, 4, then decodes."""
    s = _make_scheduler(budget=8)
    seq = _seq(20)
    s.add(seq)
    assert [_run_step(s)[seq.seq_id] for _ in range(4)] == [8, 8, 4, 1]
    assert seq.num_computed_tokens == 21 and len(seq.block_table) == 6


def test_decodes_share_a_step_with_a_prefill_chunk():
    """Running sequences' decode tokens are scheduled first; a new prompt fills the rest."""
    s = _make_scheduler(budget=10)
    a, b = _seq(3), _seq(3)
    s.add(a); s.add(b)
    _run_step(s)                      # both prefills
    c = _seq(30)
    s.add(c)
    step = _run_step(s)
    assert step == {a.seq_id: 1, b.seq_id: 1, c.seq_id: 8}


def test_max_num_seqs_caps_the_running_set():
    s = _make_scheduler(max_num_seqs=2)
    seqs = [_seq(2) for _ in range(4)]
    for q in seqs:
        s.add(q)
    assert set(_run_step(s)) == {seqs[0].seq_id, seqs[1].seq_id}
    assert len(s.waiting) == 2


def test_youngest_sequence_is_preempted_when_blocks_run_out_and_resumes():
    """Out of blocks, the most recently admitted sequence loses its cache and waits; it is
    recomputed (prompt + output so far) once blocks free up."""
    s = _make_scheduler(num_blocks=4, block_size=2, budget=64)
    old, young = _seq(4), _seq(3)          # 2 blocks + 2 blocks: the pool is full
    s.add(old); s.add(young)
    _run_step(s)
    assert s.allocator.num_free == 0
    step = _run_step(s)                    # old needs a 3rd block for its 5th token
    assert step == {old.seq_id: 1}
    assert young.status == SequenceStatus.WAITING and young.num_computed_tokens == 0
    assert young.block_table == [] and s.num_preemptions == 1
    s.finish(old, "stop")
    num_tokens = young.num_tokens                     # prompt + its one output token
    assert _run_step(s) == {young.seq_id: num_tokens}  # all recomputed in one step


def test_finish_returns_every_block():
    s = _make_scheduler()
    seqs = [_seq(5) for _ in range(3)]
    for q in seqs:
        s.add(q)
    _run_step(s)
    for q in seqs:
        s.finish(q, "abort")
    assert s.allocator.num_free == 16 and not s.running and not s.waiting


def test_lower_priority_value_is_admitted_first():
    s = _make_scheduler(max_num_seqs=1)
    low, high = _seq(2, priority=3), _seq(2, priority=0)
    s.add(low); s.add(high)
    assert set(_run_step(s)) == {high.seq_id}


def test_head_of_queue_blocks_later_requests_when_it_does_not_fit():
    """First come, first served: a small request does not overtake a big one that is waiting."""
    s = _make_scheduler(num_blocks=4, block_size=2, budget=64)
    running = _seq(6)                      # 3 blocks
    s.add(running)
    _run_step(s)
    big, small = _seq(4), _seq(1)          # big needs 2 blocks, only 1 is free
    s.add(big); s.add(small)
    step = _run_step(s)
    assert big.seq_id not in step and small.seq_id not in step


# ---- prefix caching ---------------------------------------------------------------------------
def test_a_second_prompt_with_the_same_start_shares_its_full_blocks():
    """Prompt B = A's first 9 tokens + 3 others, block size 4: B takes A's first two blocks
    (8 tokens) and computes from token 8; the third block differs, so it is B's own."""
    s = _make_scheduler(prefix_caching=True)
    a = _seq(0, prompt=list(range(100, 112)))
    s.add(a)
    _run_step(s)                                   # A's prompt is computed: 3 full blocks registered
    b = _seq(0, prompt=list(range(100, 109)) + [7, 7, 7])
    s.add(b)
    assert _run_step(s)[b.seq_id] == 12 - 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert s.allocator.ref_counts[a.block_table[0]] == 2 and s.num_cached_tokens == 8


def test_a_cached_block_is_shared_only_after_the_same_tokens_before_it():
    """A block's hash covers every token before it. A = X+Y and C = Z+W are cached (block
    size 4); B = X+W takes A's block for X, but not C's block for W: C's keys for W were
    computed after Z, so B computes W itself."""
    X, Y, Z, W = ([k] * 4 for k in (10, 11, 12, 13))
    s = _make_scheduler(prefix_caching=True)
    a, c = _seq(0, prompt=X + Y + [1]), _seq(0, prompt=Z + W + [1])
    s.add(a)
    s.add(c)
    _run_step(s)                                   # both prompts computed: their 2 full blocks registered
    b = _seq(0, prompt=X + W + [1])
    s.add(b)
    assert _run_step(s)[b.seq_id] == 9 - 4         # W and the last token are computed, X is not
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] not in (a.block_table + c.block_table)
    assert s.num_cached_tokens == 4


def test_a_fully_cached_prompt_still_computes_its_last_token():
    """The step must produce logits for the last prompt token, so a prompt of exactly two
    cached blocks takes only the first and recomputes the second."""
    s = _make_scheduler(prefix_caching=True)
    a = _seq(0, prompt=list(range(8)))
    s.add(a)
    _run_step(s)
    b = _seq(0, prompt=list(range(8)))
    s.add(b)
    assert _run_step(s)[b.seq_id] == 4 and b.block_table[0] == a.block_table[0]


def test_freed_cached_blocks_stay_cached_until_reused_tail_first():
    """A finished sequence's blocks are free (the pool counts them) but keep their contents.
    Allocation takes the least recently freed first, and a sequence frees its tail first, so
    the start of a prefix (the part others can match) is forgotten last."""
    s = _make_scheduler(num_blocks=3, prefix_caching=True)
    a = _seq(0, prompt=list(range(9)))             # 2 full blocks + 1 partial: the whole pool
    s.add(a)
    _run_step(s)
    head, tail, partial = a.block_table
    s.finish(a, "stop")
    assert s.allocator.num_free == 3 and len(s.allocator.cached) == 2
    assert s.allocator.allocate(1) == [partial] and len(s.allocator.cached) == 2   # held no hash
    assert s.allocator.allocate(1) == [tail] and list(s.allocator.cached.values()) == [head]
    s.allocator.free([partial, tail])
    b = _seq(0, prompt=list(range(9)))
    s.add(b)
    assert _run_step(s)[b.seq_id] == 9 - 4 and b.block_table[0] == head


def test_requests_for_prompt_logprobs_compute_every_prompt_token():
    """Prompt logprobs need the logits at every prompt position, so a sequence that still
    owes them takes no cached blocks (its own full blocks are still shared with others)."""
    s = _make_scheduler(prefix_caching=True)
    a = _seq(0, prompt=list(range(12)))
    s.add(a)
    _run_step(s)
    b = _seq(0, prompt=list(range(12)), params=SamplingParams(max_tokens=2, prompt_logprobs=1))
    b.prompt_logprobs = [None]                     # as the engine sets it: nothing reported yet
    s.add(b)
    assert _run_step(s)[b.seq_id] == 12 and not set(b.block_table) & set(a.block_table)
