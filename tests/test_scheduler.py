"""The scheduler's policy, on plain Sequence objects (no model)."""
from __future__ import annotations

from nanoserve.kv_cache import BlockAllocator
from nanoserve.scheduler import Scheduler
from nanoserve.sequence import SamplingParams, Sequence, SequenceStatus

_ids = iter(range(10_000))


def _make_scheduler(num_blocks: int = 16, block_size: int = 4, max_num_seqs: int = 8,
                    budget: int = 32) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), block_size, max_num_seqs, budget)


def _seq(prompt_len: int, priority: int = 0) -> Sequence:
    i = next(_ids)
    return Sequence(seq_id=i, request_id=str(i), index=0, prompt_token_ids=[1] * prompt_len,
                    params=SamplingParams(max_tokens=8), priority=priority, arrival=i)


def _run_step(sched: Scheduler) -> dict[int, int]:
    """Schedule, then pretend the model ran: advance counters, append a token when sampled."""
    out = sched.schedule()
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
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
