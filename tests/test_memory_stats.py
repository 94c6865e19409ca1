"""Memory you can see: LLMEngine.get_stats(), per-request KV metrics, the periodic stats log,
and bench's memory line, each checked against the block allocator itself."""
from __future__ import annotations

import logging
import random

from nanoserve import LLM, SamplingParams
from nanoserve.bench import memory_usage
from nanoserve.config import cdiv


def _prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(50256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _small(ckpt, **kw) -> LLM:
    return LLM(str(ckpt), device="cpu", quiet=True, block_size=4, **kw)


def test_stats_agree_with_the_allocator_at_every_step(tiny_ckpt):
    """Without prefix sharing, used blocks = the blocks the running sequences hold = blocks the
    allocator has handed out; used + free = total; the peak is the largest `used` ever seen;
    running and waiting counts are the scheduler's queues."""
    llm = _small(tiny_ckpt, num_blocks=24, max_num_batched_tokens=24, enable_prefix_caching=False)
    eng = llm.engine
    for i, p in enumerate(_prompts(8)):
        eng.add_request(None, p, SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True))
    seen_peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        s = eng.get_stats()
        held = sum(len(seq.block_table) for seq in eng.scheduler.running)
        assert s["num_blocks_used"] == held == eng.allocator.num_used
        assert s["num_blocks_used"] + s["num_blocks_free"] == s["num_blocks_total"] == 24
        assert s["num_blocks_free"] == eng.allocator.num_free
        assert (s["num_running"], s["num_waiting"]) == (len(eng.scheduler.running), len(eng.scheduler.waiting))
        assert abs(s["kv_cache_usage"] - held / 24) < 1e-12
        seen_peak = max(seen_peak, held)
        assert s["peak_blocks_used"] >= seen_peak
    assert s["peak_blocks_used"] == seen_peak > 0
    assert s["num_blocks_used"] == 0 and s["num_running"] == s["num_waiting"] == 0


def test_free_blocks_that_keep_a_prefix_count_as_cached_free_and_hits_are_rated(tiny_ckpt):
    """After a request finishes, its full blocks are free but still registered: cached-free
    counts exactly those. Running the same prompt again takes them: the hit rate is the cached
    tokens over the tokens looked up."""
    llm = _small(tiny_ckpt, num_blocks=64)
    prompt = _prompts(1, seed=3, lo=21, hi=21)[0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([prompt], params)
    s = llm.engine.get_stats()
    a = llm.engine.allocator
    assert s["num_blocks_used"] == 0
    assert s["num_blocks_cached_free"] == len(a.hash_of) == (21 + 3 - 1) // 4
    assert s["prefix_cache_hit_rate"] == 0.0
    llm.generate([prompt], params)
    cached = (21 - 1) // 4 * 4                       # full blocks of the prompt, one token left to compute
    assert llm.engine.get_stats()["prefix_cache_hit_rate"] == cached / (21 + 21)


def test_cached_free_count_equals_a_recount_under_sharing_and_preemption(tiny_ckpt):
    """The allocator keeps num_cached_free as a running count (get_stats is read every step by
    servers); it equals a recount of free blocks with a hash after every step, while prompts
    that share prefixes run in a pool small enough to preempt and to recycle cached blocks."""
    llm = _small(tiny_ckpt, num_blocks=16, max_num_batched_tokens=24, max_num_seqs=6)
    eng, a = llm.engine, llm.engine.allocator
    shared = _prompts(1, seed=6, lo=13, hi=13)[0]
    for i, tail in enumerate(_prompts(10, seed=7, lo=0, hi=9)):
        eng.add_request(None, shared + tail, SamplingParams(temperature=0, max_tokens=6 + i % 5, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
        assert a.num_cached_free == sum(a.ref_counts[i] == 0 for i in a.hash_of)
    assert eng.get_stats()["num_preemptions"] > 0 and eng.scheduler.num_cached_tokens > 0
    assert a.num_cached_free == len(a.hash_of) > 0


def test_request_metrics_give_the_most_blocks_each_request_held(tiny_ckpt):
    """A lone request ends holding cdiv(prompt + max_tokens - 1, BS) blocks (the last token is
    never fed back); batched, each request's metric equals the largest block table seen."""
    llm = _small(tiny_ckpt, num_blocks=64)
    out = llm.generate([[5] * 9], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.metrics.num_kv_blocks_peak == cdiv(9 + 12 - 1, 4)
    eng = llm.engine
    ids = [eng.add_request(None, p, SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True))
           for i, p in enumerate(_prompts(5, seed=2))]
    peak = dict.fromkeys(ids, 0)
    finals = {}
    while eng.has_unfinished_requests():
        for rid, req in eng.requests.items():
            peak[rid] = max(peak[rid], len(req.seqs[0].block_table))
        for o in eng.step():
            if o.finished:
                finals[o.request_id] = o.metrics.num_kv_blocks_peak
    assert finals == peak


def test_preemptions_are_counted_per_request_and_in_the_stats(tiny_ckpt):
    """A pool too small for the batch preempts; the requests' metrics add up to get_stats()'s count."""
    llm = _small(tiny_ckpt, num_blocks=12, max_num_batched_tokens=24, max_num_seqs=6)
    outs = llm.generate(_prompts(12, seed=1), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    total = llm.engine.get_stats()["num_preemptions"]
    assert total > 0, "the test should exercise preemption"
    assert sum(o.metrics.num_preemptions for o in outs) == total


def test_engine_logs_a_stats_line_while_busy_and_nothing_when_quiet(tiny_ckpt, caplog):
    """With a log interval shorter than a step, each step logs throughput, queues and KV usage;
    quiet=True silences it."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="nanoserve"):
        llm = LLM(str(tiny_ckpt), device="cpu", quiet=False, log_stats_interval=1e-6, num_blocks=32)
        caplog.clear()
        llm.generate([[1, 2, 3]], params)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine:")]
        assert len(lines) >= 3
        for key in ("prompt", "generation", "tok/s", "running", "waiting", "preempted", "KV cache",
                    "/32 blocks", "prefix cache hit rate"):
            assert key in lines[0]
        caplog.clear()
        quiet = LLM(str(tiny_ckpt), device="cpu", quiet=True, log_stats_interval=1e-6, num_blocks=32)
        quiet.generate([[1, 2, 3]], params)
        assert not [r for r in caplog.records if r.getMessage().startswith("engine:")]


def test_bench_memory_line_reports_the_kv_peak_of_the_last_run(tiny_ckpt):
    """memory_usage(): peak KV bytes = peak blocks x bytes per block, measured from the last
    reset; the process peak RSS is positive."""
    from nanoserve.bench import run_nanoserve
    llm = _small(tiny_ckpt, num_blocks=64)
    run_nanoserve(llm, _prompts(3, seed=4, lo=20, hi=20), 5)
    mem = memory_usage(llm)
    s = llm.engine.get_stats()
    assert mem["peak_kv_blocks"] == 3 * cdiv(24, 4) == s["peak_blocks_used"]
    assert mem["peak_kv_mib"] * 2**20 == mem["peak_kv_blocks"] * s["kv_block_bytes"]
    assert mem["max_rss_mib"] > 0
    run_nanoserve(llm, _prompts(1, seed=5, lo=4, hi=4), 2)
    assert memory_usage(llm)["peak_kv_blocks"] == cdiv(5, 4)
