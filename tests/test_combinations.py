"""Features where they meet: context shifting and sliding windows together with n > 1, seeds,
prefix caching, prompt logprobs, preemption, stop strings, bfloat16 and int8 linears, padded
vocabularies, per-request failures, aborts and the memory stats. Each feature has its own tests;
these check that combining them changes nothing that either one promises. The reference is
always the same requests run alone, or without the feature that cannot change the result."""
from __future__ import annotations

import random

import pytest
import torch

from nanoserve import LLM, SamplingParams

N_CTX, BS = 64, 8


def _ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50256) for _ in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny GPT-2 with n_ctx 64, so that generations shift after a few dozen tokens."""
    from conftest import make_hf_model, save_checkpoint
    return str(save_checkpoint(make_hf_model(seed=3, n_positions=N_CTX), tmp_path_factory.mktemp("c") / "hub"))


def _llm(ckpt: str, **kw) -> LLM:
    return LLM(ckpt, device="cpu", quiet=True, block_size=BS, **kw)


def _check_stats_and_empty(llm: LLM) -> None:
    """get_stats adds up, and every block, sequence and request is gone."""
    eng, s = llm.engine, llm.engine.get_stats()
    assert s["num_blocks_used"] + s["num_blocks_free"] == s["num_blocks_total"] == eng.num_blocks
    assert s["peak_blocks_used"] >= s["num_blocks_used"] and s["peak_blocks_used"] <= eng.num_blocks
    assert 0 <= s["num_blocks_cached_free"] <= s["num_blocks_free"]
    assert s["num_blocks_used"] == 0 and eng.allocator.num_free == eng.num_blocks, "KV blocks leaked"
    assert s["num_running"] == s["num_waiting"] == 0 and not eng.requests


def _drive(eng, check_stats: bool = True) -> dict:
    """Step until done, checking the stats' sums at every step; the finished outputs by id."""
    final = {}
    while eng.has_unfinished_requests():
        final |= {o.request_id: o for o in eng.step() if o.finished}
        if check_stats:
            s = eng.get_stats()
            assert s["num_blocks_used"] + s["num_blocks_free"] == s["num_blocks_total"]
            assert s["peak_blocks_used"] >= s["num_blocks_used"]
            assert 0 <= s["num_blocks_cached_free"] <= s["num_blocks_free"]
    return final


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


# ---- context shifting with other features -------------------------------------------------------
def test_shifted_n2_seeded_request_equals_its_completions_as_separate_seeded_requests(ckpt):
    """A sampled request with n=2 and seed s that shifts several times, beside others sharing
    its prompt (prefix caching on) in a pool small enough to preempt, gives completion i the
    tokens of a lone request with seed s + i, shifts and all."""
    prompt = _ids(30, seed=1)
    shifted = _llm(ckpt, context_overflow="shift", shift_window=24, num_blocks=14, max_num_batched_tokens=40)
    p = dict(temperature=1.0, max_tokens=90, ignore_eos=True)
    outs = shifted.generate([prompt, prompt, prompt + [7]],
                            [SamplingParams(n=2, seed=5, **p), SamplingParams(seed=9, **p),
                             SamplingParams(seed=11, **p)], use_tqdm=False)
    assert shifted.engine.scheduler.num_preemptions > 0 and shifted.engine.scheduler.num_shifts >= 6
    assert shifted.engine.scheduler.num_cached_tokens > 0, "the shared prompt should hit the prefix cache"
    _check_stats_and_empty(shifted)
    roomy = _llm(ckpt, context_overflow="shift", shift_window=24, enable_prefix_caching=False)
    for seed, got in [(5, outs[0].outputs[0]), (6, outs[0].outputs[1]), (9, outs[1].outputs[0])]:
        alone = roomy.generate([prompt], SamplingParams(seed=seed, **p), use_tqdm=False)[0].outputs[0]
        assert got.token_ids == alone.token_ids
    _check_stats_and_empty(roomy)


def test_prompt_logprobs_survive_shifts_and_preemption_unchanged(ckpt):
    """prompt_logprobs of a request that then shifts and is preempted are reported once, for
    every prompt position, and equal those of a plain engine with max_tokens=1."""
    prompt = _ids(40, seed=2)
    shifted = _llm(ckpt, context_overflow="shift", shift_window=20, num_blocks=12, max_num_batched_tokens=24)
    p = SamplingParams(temperature=0, max_tokens=70, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    outs = shifted.generate([prompt, _ids(35, seed=3)], [p, SamplingParams(temperature=0, max_tokens=70,
                                                                            ignore_eos=True)], use_tqdm=False)
    plain = _llm(ckpt).generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert shifted.engine.scheduler.num_shifts > 0 and shifted.engine.scheduler.num_preemptions > 0
    got, want = outs[0].prompt_logprobs, plain.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert g.keys() == w.keys() and list(g.values()) == pytest.approx(list(w.values()), abs=1e-5)
    assert len(outs[0].outputs[0].logprobs) == 70
    _check_stats_and_empty(shifted)


def test_stop_string_after_a_shift_with_special_tokens_shown_cuts_where_the_text_says(ckpt):
    """With skip_special_tokens=False and a forced <|endoftext|> stream broken by shifts, a stop
    string that first appears after the shift cuts the text there, as a full search of the
    untouched generation's text would."""
    shifted = _llm(ckpt, context_overflow="shift", shift_window=16)
    eos = shifted.engine.model_config.eos_token_id
    prompt = _ids(20, seed=4)
    base = dict(temperature=0, ignore_eos=True, skip_special_tokens=False, logit_bias={eos: 4.0})
    free = shifted.generate([prompt], SamplingParams(max_tokens=80, **base), use_tqdm=False)[0].outputs[0]
    full = free.text
    # a stop string made of text generated after the first shift (token 45 on: past n_ctx)
    after = shifted.tokenizer.decode(free.token_ids[:50])
    stop = full[len(after):len(after) + 6]
    assert stop and full.find(stop) >= len(after) - 6 >= 0
    out = shifted.generate([prompt], SamplingParams(max_tokens=80, stop=[stop], **base), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == full[:full.find(stop)]
    _check_stats_and_empty(shifted)


# ---- sliding windows with other features ---------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(dtype="bfloat16"), dict(quantization="int8")])
def test_a_window_wider_than_the_context_changes_nothing_in_bf16_or_int8(ckpt, kw):
    """attention_window=n_ctx evicts nothing a query could see, so with bfloat16 or int8 linears,
    n=2 and chunked prefill, tokens and logprobs equal the same engine without a window (and
    without prefix caching, which a window turns off: shared blocks change how steps batch).
    Both run model.py for every step (fused_decode=False): the CPU's C++ decode step takes no
    window, and its float32 activations differ from the bf16 forward's in the last bits."""
    prompts = [_ids(50, seed=5), _ids(9, seed=6)]
    params = [SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=14, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1)]
    runs = []
    for window in (None, N_CTX):
        llm = _llm(ckpt, attention_window=window, enable_prefix_caching=False, max_num_batched_tokens=16,
                   fused_decode=False, **kw)
        runs.append(llm.generate(prompts, params, use_tqdm=False))
        _check_stats_and_empty(llm)
    assert _tokens(runs[0]) == _tokens(runs[1])
    assert [[c.logprobs for c in o.outputs] for o in runs[0]] == [[c.logprobs for c in o.outputs] for o in runs[1]]
    assert runs[0][1].prompt_logprobs == runs[1][1].prompt_logprobs


def test_windowed_chunked_prefill_and_n2_equal_one_step_prefill_and_lone_seeded_requests(ckpt):
    """Under a 20-token window, a 50-token prompt prefilled in 8-token chunks while eviction
    runs gives the tokens of a one-step prefill, and a windowed n=2 seeded request equals its
    completions as lone requests with seeds s and s + 1."""
    prompt = _ids(50, seed=7)
    p = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    chunked = _llm(ckpt, attention_window=20, max_num_batched_tokens=8)
    whole = _llm(ckpt, attention_window=20)
    a = chunked.generate([prompt], SamplingParams(n=2, seed=3, **p), use_tqdm=False)[0]
    assert chunked.engine.scheduler.num_evicted_blocks > 0
    for i in range(2):
        alone = whole.generate([prompt], SamplingParams(seed=3 + i, **p), use_tqdm=False)[0]
        assert a.outputs[i].token_ids == alone.outputs[0].token_ids
    _check_stats_and_empty(chunked)
    _check_stats_and_empty(whole)


# ---- padded vocabularies with the CPU linears ----------------------------------------------------
@pytest.mark.parametrize("kw", [dict(quantization="int8"), dict(dtype="bfloat16")])
def test_padded_ids_never_appear_with_int8_or_bf16_linears(tmp_path_factory, kw):
    """A 50304-row checkpoint whose padded rows are rigged to win: with int8 or bfloat16 linears,
    sampled ids and every logprob and prompt_logprob key stay below 50257."""
    from conftest import make_hf_model, save_checkpoint
    hf = make_hf_model(vocab_size=50304, n_positions=N_CTX)
    with torch.no_grad():
        hf.transformer.ln_f.bias[0] = 50.0
        hf.transformer.wte.weight[50257:] = 0.0
        hf.transformer.wte.weight[50257:, 0] = 10.0
    llm = _llm(str(save_checkpoint(hf, tmp_path_factory.mktemp("padded") / "hub")), **kw)
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=5, prompt_logprobs=5),
              SamplingParams(temperature=1.0, seed=2, max_tokens=5, ignore_eos=True, logprobs=20)]
    outs = llm.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    ids = set()
    for o in outs:
        for c in o.outputs:
            ids |= set(c.token_ids) | {k for d in c.logprobs for k in d}
        ids |= {k for d in o.prompt_logprobs or [] for k in d or {}}
    assert len(ids) > 10 and max(ids) < 50257
    _check_stats_and_empty(llm)


# ---- failures and aborts while others shift or are preempted --------------------------------------
def test_a_failing_request_leaves_shifting_and_preempted_neighbours_correct(ckpt, monkeypatch):
    """A request whose bookkeeping raises mid-run fails alone while the others shift and are
    preempted in a tiny pool: they finish with their alone tokens, and every block comes back."""
    llm = _llm(ckpt, context_overflow="shift", shift_window=24, num_blocks=12, max_num_batched_tokens=32)
    eng, real = llm.engine, llm.engine.outputs.append

    def append(seq, token, logprobs):
        if seq.request_id == "bad" and len(seq.output_token_ids) == 30:
            raise KeyError("undecodable token")
        return real(seq, token, logprobs)
    monkeypatch.setattr(eng.outputs, "append", append)
    p = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = {"bad": _ids(30, seed=8), "a": _ids(30, seed=9), "b": _ids(20, seed=10)}
    for rid, prompt in prompts.items():
        eng.add_request(rid, prompt, SamplingParams(n=2, temperature=0.9, seed=1, max_tokens=60, ignore_eos=True)
                        if rid == "bad" else p)
    final = _drive(eng)
    assert eng.scheduler.num_shifts > 0 and eng.scheduler.num_preemptions > 0
    assert "undecodable token" in final["bad"].error
    assert [c.finish_reason for c in final["bad"].outputs] == ["abort", "abort"]
    monkeypatch.setattr(eng.outputs, "append", real)
    roomy = _llm(ckpt, context_overflow="shift", shift_window=24)
    for rid in ("a", "b"):
        assert final[rid].error is None
        assert final[rid].outputs[0].token_ids == roomy.generate([prompts[rid]], p)[0].outputs[0].token_ids
    _check_stats_and_empty(llm)


def test_aborts_just_after_a_shift_and_while_preempted_free_everything(ckpt):
    """Aborting a request the step after it shifted (waiting to recompute its kept window) and
    another while it sits preempted frees their blocks; the third request finishes with its
    alone tokens and the pool ends empty."""
    llm = _llm(ckpt, context_overflow="shift", shift_window=24, num_blocks=12, max_num_batched_tokens=32)
    eng = llm.engine
    p = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = {"s": _ids(40, seed=11), "k": _ids(30, seed=12), "x": _ids(25, seed=13)}
    for rid, prompt in prompts.items():
        eng.add_request(rid, prompt, p)
    aborted, final = {}, {}
    while eng.has_unfinished_requests():
        final |= {o.request_id: o for o in eng.step() if o.finished}
        by_req = {s.request_id: s for s in eng.scheduler.waiting}
        if "s" not in aborted and "s" in by_req and by_req["s"].num_shifts > 0:
            aborted["s"] = eng.abort_request("s")
        if "x" not in aborted and "x" in by_req and by_req["x"].num_preemptions > 0:
            aborted["x"] = eng.abort_request("x")
        s = eng.get_stats()
        assert s["num_blocks_used"] + s["num_blocks_free"] == s["num_blocks_total"]
        held = sum(len(q.block_table) - q.num_evicted_blocks for q in eng.scheduler.running + eng.scheduler.waiting)
        assert s["num_blocks_used"] == held
    assert aborted.keys() == {"s", "x"}, "the test should abort mid-shift and while preempted"
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in aborted.values())
    alone = _llm(ckpt, context_overflow="shift", shift_window=24).generate([prompts["k"]], p)[0]
    assert final["k"].outputs[0].token_ids == alone.outputs[0].token_ids
    _check_stats_and_empty(llm)


# ---- a full n_ctx window scored -------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(context_overflow="shift", shift_window=32), dict(attention_window=N_CTX),
                                dict(attention_window=N_CTX, max_num_batched_tokens=16)])
def test_a_full_n_ctx_prompt_is_scored_the_same_under_shift_or_a_full_window(ckpt, kw):
    """A 64-token prompt (all of n_ctx) with prompt_logprobs and max_tokens=1 is accepted with
    context shifting on or a window of n_ctx (also chunked): its prompt logprobs and its one
    token equal the plain engine's."""
    prompt = _ids(N_CTX, seed=14)
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    plain = _llm(ckpt).generate([prompt], p, use_tqdm=False)[0]
    llm = _llm(ckpt, **kw)
    out = llm.generate([prompt], p, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    assert len(out.prompt_logprobs) == N_CTX
    for g, w in zip(out.prompt_logprobs[1:], plain.prompt_logprobs[1:]):
        assert g.keys() == w.keys() and list(g.values()) == pytest.approx(list(w.values()), abs=1e-5)
    _check_stats_and_empty(llm)


def test_a_full_n_ctx_prompt_under_a_narrow_window_scores_every_position(ckpt):
    """Under a 16-token window, a 64-token prompt with prompt_logprobs and max_tokens=1 gets all
    63 prompt logprobs, the same whether prefilled at once or in 8-token chunks."""
    prompt = _ids(N_CTX, seed=15)
    p = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = []
    for budget in (None, 8):
        llm = _llm(ckpt, attention_window=16, max_num_batched_tokens=budget)
        outs.append(llm.generate([prompt], p, use_tqdm=False)[0])
        _check_stats_and_empty(llm)
    a, b = outs
    assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == N_CTX
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for g, w in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert g.keys() == w.keys() and list(g.values()) == pytest.approx(list(w.values()), abs=1e-5)


# ---- skip_special_tokens=False with stop conditions ---------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_an_eos_that_a_stop_token_id_ended_is_not_text_even_with_ignore_eos(ckpt, stream):
    """With skip_special_tokens=False, an <|endoftext|> that ended the sequence is left out of
    the text whether EOS itself or stop_token_ids=[eos] (with ignore_eos=True) stopped it: the
    same tokens and finish reason give the same text, streamed or not."""
    llm = _llm(ckpt)
    eos = llm.engine.model_config.eos_token_id

    def run(**kw):
        params = SamplingParams(temperature=0, max_tokens=3, logit_bias={eos: 100}, skip_special_tokens=False, **kw)
        if not stream:
            c = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0]
        else:
            llm.engine.add_request("r", [1, 2, 3], params)
            c = _drive(llm.engine)["r"].outputs[0]
        return c.text, c.finish_reason, c.token_ids
    assert run(ignore_eos=True, stop_token_ids=[eos]) == run() == ("", "stop", [eos])
    _check_stats_and_empty(llm)


# ---- context shifting at the edge of the KV pool -------------------------------------------------
@pytest.mark.parametrize("short, fits", [
    (dict(block_size=1, num_blocks=N_CTX - 1), dict(block_size=1, num_blocks=N_CTX)),
    (dict(enable_kv_cache=False, max_num_batched_tokens=N_CTX - 1),
     dict(enable_kv_cache=False, max_num_batched_tokens=N_CTX)),
])
def test_under_shift_a_context_needs_n_ctx_slots_so_one_fewer_is_refused_up_front(ckpt, short, fits):
    """A shifting sequence computes n_ctx tokens (positions 0..n_ctx-1) before its shift, so a
    KV pool (or, without a KV cache, a step budget) of n_ctx - 1 tokens is refused when the
    request is added, naming the limit, instead of failing the engine mid-generation; one of
    exactly n_ctx tokens runs through its shifts."""
    p = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    llm = LLM(ckpt, device="cpu", quiet=True, context_overflow="shift", **short)
    with pytest.raises(ValueError, match=rf"n_ctx\) = {N_CTX} tokens"):
        llm.generate([[1, 2, 3]], p, use_tqdm=False)
    _check_stats_and_empty(llm)
    llm = LLM(ckpt, device="cpu", quiet=True, context_overflow="shift", **fits)
    out = llm.generate([[1, 2, 3]], p, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 80 and out.metrics.num_shifts >= 1
    _check_stats_and_empty(llm)
