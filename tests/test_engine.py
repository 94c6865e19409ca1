"""End-to-end engine behaviour: batching, preemption, stop conditions, n, bad input, leaks."""
from __future__ import annotations

import random

import pytest
import torch

from nanoserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(50256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _assert_pool_free(llm: LLM) -> None:
    eng = llm.engine
    assert eng.allocator.num_free == eng.num_blocks, "KV blocks leaked"
    assert eng.allocator.num_used == 0
    assert not eng.scheduler.waiting and not eng.scheduler.running and not eng.requests


def test_batched_greedy_equals_each_prompt_alone(tiny_llm):
    """24 prompts of varied lengths generated together give the same tokens as each alone."""
    prompts = _prompts(24)
    together = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, together):
        alone = tiny_llm.generate([prompt], GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.prompt_token_ids == prompt
    _assert_pool_free(tiny_llm)


def test_tiny_pool_queues_chunks_and_preempts_but_outputs_are_unchanged(tiny_ckpt, tiny_llm):
    """With a KV pool of 12 blocks x 4 tokens and a 24-token budget, requests queue, long
    prompts are chunked and running sequences get preempted; every request still finishes
    with the same tokens as with a roomy pool, and all blocks come back."""
    prompts = _prompts(24, seed=1, hi=30)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    small = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, num_blocks=12,
                max_num_batched_tokens=24, max_num_seqs=6)
    outs = small.generate(prompts, params, use_tqdm=False)
    ref = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert small.engine.scheduler.num_preemptions > 0, "the test should exercise preemption"
    _assert_pool_free(small)


def test_prefix_caching_changes_no_token_or_logprob(tiny_ckpt):
    """Prompts that share a 50-token start, run twice (the second time their full blocks come
    from the prefix cache), with and without a tiny pool that forces preemption: tokens equal
    an engine without prefix caching, logprobs agree, and every block comes back."""
    rng = random.Random(5)
    shared = [rng.randrange(50000) for _ in range(50)]
    prompts = [shared + [rng.randrange(50000) for _ in range(rng.randrange(0, 9))] for _ in range(8)]
    prompts += [shared, shared[:17]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    plain = LLM(str(tiny_ckpt), device="cpu", quiet=True, enable_prefix_caching=False)
    ref = plain.generate(prompts, params, use_tqdm=False)
    assert plain.engine.scheduler.num_cached_tokens == 0
    for kw in [{}, dict(block_size=4, num_blocks=22, max_num_batched_tokens=64, max_num_seqs=4)]:
        llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, **kw)
        for _ in range(2):
            outs = llm.generate(prompts, params, use_tqdm=False)
            for o, r in zip(outs, ref):
                assert o.outputs[0].token_ids == r.outputs[0].token_ids
                for got, want in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
                    assert got.keys() == want.keys()
                    assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)
        assert llm.engine.scheduler.num_cached_tokens >= 8 * 48, "the second run should hit the cache"
        # With the prefix warm in the cache, prompt logprobs (n=2: only the first reports them)
        # are still computed at every position.
        scored = SamplingParams(n=2, temperature=0, max_tokens=2, prompt_logprobs=1)
        got, want = (e.generate(prompts[:2], scored, use_tqdm=False) for e in (llm, plain))
        for g, w in zip(got, want):
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(g.prompt_token_ids)
            for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
                assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)
        _assert_pool_free(llm)
    assert llm.engine.scheduler.num_preemptions > 0, "the small pool should preempt"


def test_prefix_cache_never_reuses_a_block_computed_after_other_tokens(tiny_ckpt):
    """Prompts A = X+Y and C = Z+W run first; B = X+W then finds X (A's first block) in the
    prefix cache but must not take C's block for W, whose K/V depend on Z: B's tokens and
    logprobs equal an engine without prefix caching."""
    rng = random.Random(7)
    X, Y, Z, W = ([rng.randrange(50000) for _ in range(4)] for _ in range(4))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4)
    llm.generate([X + Y + [5], Z + W + [5]], params, use_tqdm=False)
    got = llm.generate([X + W + [5]], params, use_tqdm=False)[0].outputs[0]
    plain = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, enable_prefix_caching=False)
    want = plain.generate([X + W + [5]], params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids
    assert [d[t] for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(
        [d[t] for d, t in zip(want.logprobs, want.token_ids)], abs=1e-4)
    assert llm.engine.scheduler.num_cached_tokens == 4, "B should take X's block and only it"


def test_no_kv_cache_mode_gives_the_same_tokens(tiny_ckpt, tiny_llm):
    """Full recomputation every step (enable_kv_cache=False) is the same function, slower."""
    prompts = _prompts(3, seed=2, hi=20)
    slow = LLM(str(tiny_ckpt), device="cpu", quiet=True, enable_kv_cache=False)
    a = slow.generate(prompts, GREEDY, use_tqdm=False)
    b = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    _assert_pool_free(slow)


def test_seeded_request_is_the_same_alone_or_in_a_batch(tiny_llm):
    """A seeded sampled request does not depend on what else runs beside it."""
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    target = [5, 6, 7, 8]
    alone = tiny_llm.generate([target], p)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    batch = tiny_llm.generate(_prompts(5, seed=3) + [target], [others] * 5 + [p], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone
    again = tiny_llm.generate([target], p)[0].outputs[0].token_ids
    assert again == alone
    different = tiny_llm.generate([target], SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                           ignore_eos=True))[0].outputs[0].token_ids
    assert different != alone


def test_n_gives_distinct_completions_with_indices(tiny_llm):
    """n=3 with sampling returns three completions, indexed 0..2, not all identical."""
    out = tiny_llm.generate(["Hello"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8,
                                                      ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    _assert_pool_free(tiny_llm)


def test_stop_string_cuts_text_and_finishes_with_stop(tiny_llm):
    """A stop string that appears in the output ends generation; the text ends before it."""
    free = tiny_llm.generate(["x"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    # Pick a stop string from the middle of what greedy decoding produces.
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    out = tiny_llm.generate(["x"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                  stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and free.text.startswith(out.text)
    assert free.text.index(stop) == len(out.text)


def test_stop_token_ids_and_eos_finish_with_stop(tiny_llm):
    """A stop token id ends the sequence and is the last token; min_tokens delays it."""
    free = tiny_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    tok = free.outputs[0].token_ids[3]
    out = tiny_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10,
                                                        stop_token_ids=[tok]))[0].outputs[0]
    first = free.outputs[0].token_ids.index(tok)
    assert out.finish_reason == "stop" and out.token_ids == free.outputs[0].token_ids[:first + 1]
    late = tiny_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10, min_tokens=10,
                                                         stop_token_ids=[tok]))[0].outputs[0]
    assert len(late.token_ids) == 10 and late.finish_reason == "length" and tok not in late.token_ids


def test_logit_bias_forces_or_forbids_tokens(tiny_llm):
    """logit_bias +100 on one token makes greedy decoding emit only it; -100 on the token greedy
    decoding would pick first makes it pick another."""
    out = tiny_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                        logit_bias={42: 100}))[0].outputs[0]
    assert out.token_ids == [42] * 8
    first = tiny_llm.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids[0]
    other = tiny_llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                          logit_bias={first: -100}))[0].outputs[0]
    assert other.token_ids[0] != first


def test_step_streams_partial_outputs_until_finished(tiny_llm):
    """LLMEngine.step() returns growing partial outputs, the last one marked finished."""
    eng = tiny_llm.engine
    eng.add_request("s1", [10, 11, 12], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    lengths = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            lengths.append((len(out.outputs[0].token_ids), out.finished))
    assert lengths == [(1, False), (2, False), (3, False), (4, False), (5, True)]


def test_abort_frees_blocks_and_reports_abort(tiny_llm):
    """Aborting a running request returns its blocks at once and marks it 'abort'."""
    eng = tiny_llm.engine
    eng.add_request("a1", list(range(40)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("a2", list(range(5)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.step()
    assert eng.allocator.num_free < eng.num_blocks
    final = eng.abort_request("a1")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.metrics.finished_time >= final.metrics.arrival_time
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "a2" and outs[-1].outputs[0].finish_reason == "length"
    _assert_pool_free(tiny_llm)


def test_a_failing_step_leaves_the_engine_clean(tiny_llm, monkeypatch):
    """If a step raises (a device error, Ctrl-C) inside generate, the requests it queued are
    aborted: no blocks stay taken and the next generate works."""
    eng = tiny_llm.engine
    real, calls = eng.runner.launch, []

    def failing(sched, prev=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(sched, prev)
    monkeypatch.setattr(eng.runner, "launch", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        tiny_llm.generate([[1, 2, 3], [4, 5]], GREEDY)
    assert not eng.has_unfinished_requests()
    _assert_pool_free(tiny_llm)
    monkeypatch.setattr(eng.runner, "launch", real)
    assert tiny_llm.generate([[1, 2, 3]], GREEDY)[0].finished


def test_idle_steps_release_finished_sequences_block_table_rows(tiny_ckpt):
    """step() on an engine with nothing to do (say, after the last request was aborted) still
    hands the runner the sequences that finished, so their block-table rows come back."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, max_num_seqs=2)
    for _ in range(6):                         # more rounds than the runner has rows (3)
        llm.engine.add_request(None, [1, 2, 3], GREEDY)
        llm.engine.step()
        llm.engine.abort_request(next(iter(llm.engine.requests)))
        assert llm.engine.step() == []
    assert llm.generate([[1, 2, 3]], GREEDY)[0].finished
    assert llm.engine.step() == []             # rows are handed back at the next step
    assert len(llm.engine.runner.free_rows) == 3 and not llm.engine.runner.row_of


def test_generated_request_ids_skip_ids_the_caller_took(tiny_llm):
    """add_request(None, ...) numbers its requests; a caller's own request "0" does not
    collide with them."""
    eng = tiny_llm.engine
    eng.add_request("0", [7, 8], GREEDY)
    eng.add_request("1", [7, 8], GREEDY)
    rid = eng.add_request(None, [1, 2, 3], GREEDY)
    assert rid not in ("0", "1")
    for r in ("0", "1", rid):
        eng.abort_request(r)
    _assert_pool_free(tiny_llm)


def test_generate_refuses_to_run_while_engine_requests_are_pending(tiny_llm):
    """LLM.generate would have to run requests added through llm.engine and could give their
    outputs to no one: it raises, naming them, and leaves them queued and intact."""
    eng = tiny_llm.engine
    eng.add_request("mine", [7, 8], GREEDY)
    with pytest.raises(RuntimeError, match=r"llm.engine.*'mine'"):
        tiny_llm.generate([[1, 2, 3]], GREEDY)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "mine" and len(outs[-1].outputs[0].token_ids) == 12
    assert tiny_llm.generate([[1, 2, 3]], GREEDY)[0].finished
    _assert_pool_free(tiny_llm)


def test_sampling_params_are_copied_when_a_request_is_added(tiny_llm):
    """A queued request keeps the params it was added with: changing the caller's object (or
    its stop list) afterwards does not reach it."""
    eng = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, stop=["zzz"])
    eng.add_request("copied", [1, 2], params)
    params.max_tokens = 10**6
    params.stop.append("")                       # an empty stop string would match at once
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert len(outs[-1].outputs[0].token_ids) == 3 and outs[-1].outputs[0].finish_reason == "length"
    _assert_pool_free(tiny_llm)


def test_params_mutated_past_their_limits_are_refused_at_add_request(tiny_llm):
    """Params changed after construction are checked again when added."""
    params = SamplingParams(max_tokens=4)
    params.max_tokens = 10**6
    with pytest.raises(ValueError, match="n_ctx"):
        tiny_llm.generate([[1, 2]], params)
    params.max_tokens, params.temperature = 4, -1.0
    with pytest.raises(ValueError, match="temperature"):
        tiny_llm.generate([[1, 2]], params)
    _assert_pool_free(tiny_llm)


@pytest.mark.parametrize("kwargs, field", [
    (dict(ignore_eos="no"), "ignore_eos"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop=123), "stop"), (dict(stop=["ok", 5]), "stop"), (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(logit_bias=[(5, 1.0)]), "logit_bias"),
])
def test_sampling_params_of_the_wrong_type_raise_type_error_naming_the_field(kwargs, field):
    with pytest.raises(TypeError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kwargs)


def test_prompt_token_ids_must_be_a_list_not_text(tiny_llm):
    """{"prompt_token_ids": "abc"} is a TypeError, not a text prompt tokenized behind the caller's back."""
    with pytest.raises(TypeError, match="prompt_token_ids must be a list"):
        tiny_llm.generate({"prompt_token_ids": "abc"}, GREEDY)
    _assert_pool_free(tiny_llm)


def test_without_kv_cache_a_sequence_must_fit_one_step(tiny_ckpt):
    """With enable_kv_cache=False each step recomputes whole sequences, so one that outgrows the
    step budget could never finish: it is refused up front; one that fits equals the cached run."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, enable_kv_cache=False, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        llm.generate([list(range(10))], SamplingParams(max_tokens=2))
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cached = LLM(str(tiny_ckpt), device="cpu", quiet=True).generate([[1, 2, 3, 4, 5]], p)[0]
    assert llm.generate([[1, 2, 3, 4, 5]], p)[0].outputs[0].token_ids == cached.outputs[0].token_ids


def test_length_finish_with_stop_strings_keeps_a_trailing_partial_character(tiny_llm):
    """A sequence ending mid-character shows U+FFFD for the partial bytes, as decode() does,
    whether or not it had stop strings (which detokenize as they go)."""
    tok = tiny_llm.tokenizer
    lead = next(i for i in range(256) if tok.token_bytes(i) == b"\xe2")     # starts a 3-byte character
    p = dict(temperature=0, max_tokens=2, ignore_eos=True, logit_bias={lead: 100})
    plain = tiny_llm.generate([[1, 2]], SamplingParams(**p))[0].outputs[0]
    with_stop = tiny_llm.generate([[1, 2]], SamplingParams(**p, stop=["zzz"]))[0].outputs[0]
    assert plain.token_ids == with_stop.token_ids == [lead, lead]
    assert with_stop.text == plain.text == tok.decode([lead, lead])


def test_priority_orders_the_waiting_queue(tiny_ckpt):
    """With one sequence at a time, a lower priority value runs first regardless of arrival."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, max_num_seqs=1)
    eng = llm.engine
    p = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    eng.add_request("late", [1, 2], p, priority=5)
    eng.add_request("urgent", [3, 4], p, priority=-1)
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["urgent", "late"]


@pytest.mark.parametrize("prompt, params, error, words", [
    ("", SamplingParams(), ValueError, "empty"),
    ([], SamplingParams(), ValueError, "empty"),
    ([1, 2, 50257], SamplingParams(), ValueError, "50257"),
    ([1, -1], SamplingParams(), ValueError, "-1"),
    ([1] * 120, SamplingParams(max_tokens=20), ValueError, r"n_ctx \+ 1 = 129"),
    (12345, SamplingParams(), TypeError, "int"),
    ([1.5, 2], SamplingParams(), TypeError, "prompt"),
    ("hi", "not params", TypeError, "SamplingParams"),
    ([1, 2], SamplingParams(logit_bias={50257: 5.0}), ValueError, r"logit_bias has token ids \[50257\]"),
    ([1, 2], SamplingParams(stop_token_ids=[-2]), ValueError, r"stop_token_ids has token ids \[-2\]"),
    ([1, 2], SamplingParams(logprobs=60000), ValueError, r"logprobs=60000 .* vocabulary has \(50257\)"),
    ([1, 2], SamplingParams(prompt_logprobs=50258), ValueError, "prompt_logprobs=50258"),
])
def test_bad_input_raises_clearly_and_leaves_engine_serving(tiny_llm, prompt, params, error, words):
    """Invalid prompts raise with the value and limit; the engine keeps serving, no leaks."""
    with pytest.raises(error, match=words):
        tiny_llm.generate([[5, 6], prompt], params)
    _assert_pool_free(tiny_llm)
    ok = tiny_llm.generate([[5, 6]], GREEDY)[0]
    assert ok.finished and len(ok.outputs[0].token_ids) == 12


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logprobs=-1), "logprobs"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={5: 101}), "logit_bias"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(temperature=float("nan")), "temperature"), (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(top_p=float("inf")), "top_p"), (dict(logit_bias={5: float("nan")}), "logit_bias"),
])
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_keywords_raise_type_error(tiny_ckpt):
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=0.5)
    with pytest.raises(TypeError, match="block_sise"):
        LLM(str(tiny_ckpt), device="cpu", block_sise=16)


def test_request_larger_than_the_kv_pool_is_rejected(tiny_ckpt):
    """A request that could never fit the pool is refused up front, not left to starve."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="KV pool"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=8))
    assert llm.generate([[1] * 20], SamplingParams(max_tokens=8))[0].finished


def test_text_prompts_and_dict_prompts_round_trip(tiny_llm):
    """Strings are tokenized with GPT-2's BPE; dict prompts with token ids are accepted."""
    a = tiny_llm.generate("Hello, my name is", GREEDY)[0]
    ids = tiny_llm.tokenizer.encode("Hello, my name is")
    b = tiny_llm.generate([{"prompt_token_ids": ids}], GREEDY)[0]
    assert a.prompt_token_ids == ids and a.prompt == "Hello, my name is"
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].text == tiny_llm.tokenizer.decode(a.outputs[0].token_ids)


def test_compiled_cpu_attention_gives_the_same_tokens(tiny_ckpt, tiny_llm):
    """compile_cpu_attention=True (torch.compile of the decode attention) changes speed only."""
    prompts = _prompts(6, seed=5, hi=40)
    ref = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    fast = LLM(str(tiny_ckpt), device="cpu", quiet=True, compile_cpu_attention=True)
    out = fast.generate(prompts, GREEDY, use_tqdm=False)
    assert fast.engine.model.attn_fn is not tiny_llm.engine.model.attn_fn
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]


def test_cpu_engine_runs_the_tuned_decode_attention_by_default(tiny_llm):
    """On a CPU the engine swaps cpu_attention's decode path in for attention.py's reference."""
    from nanoserve import cpu_attention
    assert tiny_llm.engine.model.attn_fn is cpu_attention.decode_attention


def test_last_step_records_what_the_scheduler_decided(tiny_ckpt):
    """last_step holds each step's decision as it was made: a 10-token prompt under an
    8-token budget runs as prefill chunks 8 and 2, then decodes; the same prompt again takes
    its 2 full blocks (8 tokens) from the prefix cache at admission."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, max_num_batched_tokens=8)
    eng, prompt = llm.engine, _prompts(1, seed=9, lo=10, hi=10)[0]
    assert eng.last_step is None
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    rows = []
    for rid in ("a", "b"):
        eng.add_request(rid, prompt, params)
        while eng.has_unfinished_requests():
            eng.step()
            (row,) = eng.last_step.scheduled
            assert eng.last_step.preempted_seq_ids == []
            rows.append((row.request_id, row.num_computed_tokens, row.num_new_tokens, row.phase,
                         row.num_cached_tokens))
    assert rows == [("a", 0, 8, "prefill", 0), ("a", 8, 2, "prefill", 0), ("a", 10, 1, "decode", 0),
                    ("b", 8, 2, "prefill", 8), ("b", 10, 1, "decode", 0)]


def test_last_step_names_preempted_sequences(tiny_ckpt):
    """With a 4-block pool, two sequences that each grow to 3 blocks cannot both run: some
    step preempts one, the record lists it (and does not schedule it), and it later comes
    back as a prefill that starts from what the prefix cache still held of it."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, num_blocks=4)
    eng = llm.engine
    for rid, prompt in zip("ab", _prompts(2, seed=4, lo=6, hi=6)):
        eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    records = []
    while eng.has_unfinished_requests():
        eng.step()
        records.append(eng.last_step)
    preempting = [r for r in records if r.preempted_seq_ids]
    assert preempting, "the small pool should preempt"
    victim = preempting[0].preempted_seq_ids[0]
    assert victim not in [row.seq_id for row in preempting[0].scheduled]
    back = next(row for r in records[records.index(preempting[0]) + 1:] for row in r.scheduled
                if row.seq_id == victim)
    assert back.phase == "prefill" and back.num_computed_tokens == back.num_cached_tokens
    assert back.num_new_tokens > 1


@pytest.fixture(scope="module")
def padded_llm(tmp_path_factory):
    """nanoGPT's layout: vocab_size 50304, 47 ids past the tokenizer's 50257. The padded rows
    are rigged to win: ln_f's bias pushes the hidden state along channel 0 and only padded
    rows of the (tied) head point there, so their logits beat every real token's."""
    from conftest import make_hf_model, save_checkpoint
    hf = make_hf_model(vocab_size=50304)
    with torch.no_grad():
        hf.transformer.ln_f.bias[0] = 50.0
        hf.transformer.wte.weight[50257:] = 0.0
        hf.transformer.wte.weight[50257:, 0] = 10.0
    d = save_checkpoint(hf, tmp_path_factory.mktemp("padded") / "hub")
    return LLM(str(d), device="cpu", quiet=True)


def _ids_shown(out) -> set[int]:
    """Every token id a RequestOutput lists: sampled ids and the keys of all logprob dicts."""
    ids = set()
    for c in out.outputs:
        ids |= set(c.token_ids)
        for d in c.logprobs or []:
            ids |= set(d)
    for d in out.prompt_logprobs or []:
        ids |= set(d or {})
    return ids


def test_padded_vocabulary_ids_are_never_sampled_or_shown(padded_llm):
    """Ids past the tokenizer's vocabulary (which it could not decode) get no logits: greedy
    and sampled tokens, logprobs and prompt_logprobs all stay below 50257, even though the
    rigged padded rows would otherwise win every step."""
    assert padded_llm.engine.model_config.vocab_size == 50304
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=5),
              SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, logprobs=5)]
    outs = padded_llm.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert max(max(_ids_shown(o)) for o in outs) < 50257
    assert outs[0].outputs[0].text == padded_llm.tokenizer.decode(outs[0].outputs[0].token_ids)


@pytest.mark.parametrize("prompt, params, field", [
    ([1, 2], SamplingParams(logit_bias={50300: 100}), "logit_bias"),
    ([1, 2], SamplingParams(stop_token_ids=[50257]), "stop_token_ids"),
    ([1, 50300], SamplingParams(), "prompt token id 50300"),
])
def test_padded_ids_are_refused_in_requests(padded_llm, prompt, params, field):
    """logit_bias cannot force a padded id, nor can a stop token or prompt name one: the
    request is refused with the tokenizer's vocabulary as the limit."""
    with pytest.raises(ValueError, match=rf"{field}.*outside the vocabulary \[0, 50257\)"):
        padded_llm.generate([prompt], params)
    _assert_pool_free(padded_llm)


def test_a_request_whose_bookkeeping_raises_fails_alone(tiny_llm, monkeypatch):
    """An exception while appending one request's token (here: its detokenizer) aborts that
    request only, with the error in RequestOutput.error and its blocks freed; the request
    beside it in the same steps finishes normally and the engine keeps serving."""
    eng = tiny_llm.engine
    real = eng.outputs.append

    def append(seq, token, logprobs):
        if seq.request_id == "bad" and len(seq.output_token_ids) == 2:
            raise KeyError("undecodable token")
        return real(seq, token, logprobs)
    monkeypatch.setattr(eng.outputs, "append", append)
    eng.add_request("bad", [1, 2, 3], SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))
    eng.add_request("good", [4, 5, 6], GREEDY)
    final = {}
    while eng.has_unfinished_requests():
        final |= {o.request_id: o for o in eng.step() if o.finished}
    bad, good = final["bad"], final["good"]
    assert [c.finish_reason for c in bad.outputs] == ["abort", "abort"]
    assert "undecodable token" in bad.error and bad.metrics.finished_time is not None
    assert good.error is None and good.outputs[0].finish_reason == "length"
    assert good.outputs[0].token_ids == tiny_llm.generate([[4, 5, 6]], GREEDY)[0].outputs[0].token_ids
    _assert_pool_free(tiny_llm)


def test_a_request_whose_output_cannot_be_built_fails_alone(tiny_llm, monkeypatch):
    """If building a request's output raises (decoding its text), the step still returns the
    others' outputs and that request comes back aborted, with the error, instead of raising
    again from abort."""
    eng = tiny_llm.engine
    real = eng.outputs.detokenize

    def detokenize(seq):
        if seq.request_id == "bad" and seq.num_detok < len(seq.output_token_ids):   # text to decode
            raise ValueError("cannot decode")
        return real(seq)
    monkeypatch.setattr(eng.outputs, "detokenize", detokenize)
    eng.add_request("bad", [1, 2, 3], GREEDY)
    eng.add_request("good", [4, 5, 6], GREEDY)
    first = {o.request_id: o for o in eng.step()}
    assert first["bad"].finished and first["bad"].outputs[0].finish_reason == "abort"
    assert "cannot decode" in first["bad"].error and not first["good"].finished
    while eng.has_unfinished_requests():
        eng.step()
    _assert_pool_free(tiny_llm)


def _stop_run(tok, token_ids: list[int], stop: list[str], matcher=None) -> tuple[str, int, str | None]:
    """Feed `token_ids` one at a time through the engine's OutputProcessor with stop strings
    `stop` (matched by `matcher`, if one is given: built already); return (text, tokens
    taken, finish reason)."""
    from nanoserve.outputs import OutputProcessor
    from nanoserve.sequence import Sequence
    from nanoserve.tokenizer import IncrementalDetokenizer
    proc = OutputProcessor(tok, eos_token_id=50256, n_ctx=10**6)
    seq = Sequence(seq_id=0, request_id="r", index=0, prompt_token_ids=[1],
                   params=SamplingParams(max_tokens=len(token_ids), ignore_eos=True, stop=stop))
    seq.detok, seq.stop_strings = IncrementalDetokenizer(tok), matcher
    for t in token_ids:
        if (reason := proc.append(seq, t, None)) is not None:
            return seq.text, len(seq.output_token_ids), reason
    return seq.text, len(seq.output_token_ids), None


def _naive_stop_run(tok, token_ids: list[int], stop: list[str]) -> tuple[str, int, str | None]:
    """The reference: after each token, search the whole text for every stop string; stop at
    the first token that completes one, cutting before the earliest-starting match."""
    from nanoserve.tokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer(tok)
    for k, t in enumerate(token_ids, 1):
        detok.push(t)
        hits = [i for i in (detok.text.find(s) for s in stop) if i >= 0]
        if hits:
            return detok.text[:min(hits)], k, "stop"
    return detok.text + detok.flush(), len(token_ids), "length"


STOP_TEXT = ("abababcab the theme then, thenceforth: café 😀 naïve ab abc abcd -- end of the text; "
             "aaaa aaab ba bab")


def test_stop_strings_cut_the_text_as_a_full_search_would(tiny_llm):
    """Against a full search of the text after every token, for 300 random sets of stop
    strings (substrings of the text, so they overlap, span tokens and multi-byte characters,
    mixed with strings that never occur): the same finishing token, the same cut text."""
    tok = tiny_llm.tokenizer
    ids = tok.encode(STOP_TEXT)
    rng = random.Random(0)
    stopped = 0
    for _ in range(300):
        stop = []
        for _ in range(rng.randint(1, 6)):
            a = rng.randrange(len(STOP_TEXT))
            stop.append(STOP_TEXT[a:a + rng.randint(1, 8)])
        stop += ["zzz", "q" * rng.randint(1, 5)]
        got, want = _stop_run(tok, ids, stop), _naive_stop_run(tok, ids, stop)
        assert got == want, (stop, got, want)
        stopped += got[2] == "stop"
    assert stopped > 250


def test_stop_check_cost_does_not_grow_with_the_number_of_stop_strings(tiny_llm):
    """Feeding 200 tokens with 10,000 stop strings that end like the text but never match in
    full costs about what it does with 1 (a generous bound, 10x + 5 ms: scanning them all, as
    a plain loop does, costs ~500x more: 830 ms against 1.7 ms here). The matcher is built once per sequence (linear
    in the strings' length, like checking them); that is not the per-token cost, so it is
    built before the clock starts."""
    import time
    from nanoserve.outputs import StopStrings
    tok = tiny_llm.tokenizer
    ids = (tok.encode(STOP_TEXT) * 10)[:200]
    rng = random.Random(1)
    many = ["\x00" + STOP_TEXT[a:a + rng.randint(1, 10)] for a in (rng.randrange(len(STOP_TEXT)) for _ in range(10_000))]

    def best_time(stop):
        times = []
        for _ in range(3):
            matcher = StopStrings(stop)
            t0 = time.perf_counter()
            assert _stop_run(tok, ids, stop, matcher)[2] == "length"
            times.append(time.perf_counter() - t0)
        return min(times)
    _stop_run(tok, ids, ["\x00x"])                  # warm up
    one, lots = best_time(["\x00x"]), best_time(many)
    assert lots < 10 * one + 0.005, f"10,000 stop strings: {lots * 1e3:.1f} ms vs 1: {one * 1e3:.1f} ms"


def test_many_stop_strings_stop_where_the_one_that_matches_does(tiny_llm):
    """Through the engine: 10,000 stop strings that never occur plus one that does cut the
    text exactly where that one alone does."""
    free = tiny_llm.generate(["x"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    p = dict(temperature=0, max_tokens=20, ignore_eos=True)
    alone = tiny_llm.generate(["x"], SamplingParams(**p, stop=[stop]))[0].outputs[0]
    crowd = tiny_llm.generate(["x"], SamplingParams(**p, stop=[f"\x00{i}" for i in range(10_000)] + [stop]))[0].outputs[0]
    assert crowd.finish_reason == alone.finish_reason == "stop"
    assert (crowd.text, crowd.token_ids) == (alone.text, alone.token_ids)


def _record_positions(llm: LLM, monkeypatch) -> list[int]:
    """Wrap the model's forward so that it records the largest position of every step."""
    model, seen = llm.engine.model, []
    real = model.forward

    def forward(input_ids, positions, *args, **kwargs):
        seen.append(int(positions.max()))
        return real(input_ids, positions, *args, **kwargs)
    monkeypatch.setattr(model, "forward", forward)
    return seen


def test_a_full_n_ctx_window_can_be_scored(monkeypatch):
    """A 1024-token prompt (the embedded model's n_ctx) with max_tokens=1 needs no position
    >= n_ctx, since the sampled token is never fed back: it is accepted, and its 1023
    prompt logprobs equal a dense Hugging Face forward over the same window."""
    from pathlib import Path
    from transformers import GPT2LMHeadModel
    model_dir = Path(__file__).resolve().parent.parent / "weights" / "nanoserve-stdlib-tiny"
    llm = LLM(str(model_dir), device="cpu", quiet=True, num_blocks=80)
    n_ctx = llm.engine.model_config.n_ctx
    text = (Path(__file__).resolve().parent / "data" / "heldout_stdlib.txt").read_text()
    window = llm.tokenizer.encode(text)[:n_ctx]
    assert len(window) == n_ctx == 1024
    positions = _record_positions(llm, monkeypatch)
    out = llm.generate([window], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert max(positions) == n_ctx - 1 and len(out.outputs[0].token_ids) == 1
    got = [d[t] for d, t in zip(out.prompt_logprobs[1:], window[1:])]
    ref = GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([window])).logits[0, :-1].float(), -1)   # (1023, V)
    want = lp.gather(1, torch.tensor(window[1:])[:, None])[:, 0].tolist()
    assert got == pytest.approx(want, abs=1e-4)


def test_no_position_at_or_past_n_ctx_ever_runs(tiny_ckpt, monkeypatch):
    """Requests at the edge (prompt + max_tokens = n_ctx + 1), sampled, through a pool small
    enough to preempt and recompute them: every step's positions stay below n_ctx = 128,
    each request gets all its tokens; one token more is refused up front."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, num_blocks=48)
    positions = _record_positions(llm, monkeypatch)
    shapes = [(128, 1), (127, 2), (100, 29), (64, 65)]
    prompts = [_prompts(1, seed=i, lo=p, hi=p)[0] for i, (p, _) in enumerate(shapes)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=m, ignore_eos=True) for i, (_, m) in enumerate(shapes)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [m for _, m in shapes]
    assert max(positions) == 127 and llm.engine.scheduler.num_preemptions > 0
    for p, m in [(128, 2), (127, 3)]:
        with pytest.raises(ValueError, match=r"n_ctx \+ 1 = 129"):
            llm.generate([[1] * p], SamplingParams(max_tokens=m))
    _assert_pool_free(llm)


def test_an_eos_id_only_the_padded_model_knows_is_refused_at_load(padded_llm, tmp_path):
    """eos_token_id 50300 fits a 50304-row checkpoint but no tokenizer id: it could never be
    sampled (padded ids get no logits), so generation could never stop on it. Refused at load."""
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(padded_llm.engine.model_dir, d)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(raw | {"eos_token_id": 50300}))
    with pytest.raises(ValueError, match=r"config.json: eos_token_id=50300 is beyond the tokenizer's 50257 tokens"):
        LLM(str(d), device="cpu", quiet=True)


@pytest.mark.parametrize("stream", [False, True])
def test_skip_special_tokens_false_shows_generated_eos_but_not_the_one_that_stopped(tiny_llm, stream):
    """With skip_special_tokens=False a generated <|endoftext|> is text (vLLM's option), except
    an EOS that ended the sequence, which is left out like any stop token; by default it is
    never text. Streamed (token by token) and bulk detokenizing agree."""
    eos = tiny_llm.engine.model_config.eos_token_id

    def text(**kw) -> tuple[str, str, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=3, logit_bias={eos: 100}, **kw)
        if not stream:
            c = tiny_llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0]
            return c.text, c.finish_reason, c.token_ids
        eng, final = tiny_llm.engine, None
        eng.add_request("skip-special", [1, 2, 3], params)
        while eng.has_unfinished_requests():
            final = next((o for o in eng.step() if o.finished), final)
        c = final.outputs[0]
        return c.text, c.finish_reason, c.token_ids
    assert text(ignore_eos=True, skip_special_tokens=False) == ("<|endoftext|>" * 3, "length", [eos] * 3)
    assert text(ignore_eos=True) == ("", "length", [eos] * 3)
    assert text(skip_special_tokens=False) == ("", "stop", [eos])


def test_prompt_graph_is_chosen_only_for_one_sampling_sequence_that_fits(tiny_llm, monkeypatch):
    """The runner replays a prompt graph (captured on CUDA only) for a step of one sequence that
    samples, has no prompt logprobs and fits a captured size, the smallest that fits; any other
    step runs eagerly. The choice is host logic, so it is checked here with stand-in graphs."""
    from nanoserve.attention import AttentionMetadata
    from nanoserve.runner import StepInputs
    runner = tiny_llm.engine.runner
    seq = object()

    def step(n_tokens: int, n_seqs: int = 1, samples: bool = True, prompt_rows: bool = False) -> StepInputs:
        meta = AttentionMetadata(slot_mapping=torch.zeros(n_tokens, dtype=torch.int64),
                                 block_tables=torch.zeros(n_seqs, 1, dtype=torch.int32),
                                 context_lens=torch.ones(n_seqs, dtype=torch.int32),
                                 query_start_loc=torch.zeros(n_seqs + 1, dtype=torch.int32),
                                 max_query_len=n_tokens, max_context_len=n_tokens)
        return StepInputs(torch.zeros(n_tokens, dtype=torch.int64), torch.zeros(n_tokens, dtype=torch.int64), meta,
                          sample_rows=[n_tokens - 1] if samples else [], sample_seqs=[seq] if samples else [],
                          prompt_rows=[0] if prompt_rows else [])

    assert runner._prefill_graph_size(step(5)) is None                 # a CPU engine captures none
    monkeypatch.setattr(runner, "prefill_graphs", {32: "graph32", 16: "graph16"})
    assert [runner._prefill_graph_size(step(n)) for n in (1, 5, 16, 17, 32)] == [16, 16, 16, 32, 32]
    assert runner._prefill_graph_size(step(33)) is None                # larger than every graph
    assert runner._prefill_graph_size(step(8, n_seqs=2)) is None       # two sequences
    assert runner._prefill_graph_size(step(8, samples=False)) is None  # a chunk that ends no prompt
    assert runner._prefill_graph_size(step(8, prompt_rows=True)) is None   # prompt logprobs: eager
