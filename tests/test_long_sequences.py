"""Long sequences: prompt truncation (SamplingParams.truncate_prompt_tokens), generation past
n_ctx by context shifting (EngineConfig.context_overflow="shift"), and sliding-window attention
with eviction of the blocks behind the window (EngineConfig.attention_window)."""
from __future__ import annotations

import random

import pytest

from nanoserve import LLM, SamplingParams


def _ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50256) for _ in range(n)]


# ---- prompt truncation ----------------------------------------------------------------------
def test_truncation_keeps_the_last_k_prompt_tokens(tiny_llm):
    """truncate_prompt_tokens=k runs the prompt's last k tokens: the output reports them as the
    prompt and continues exactly as a request for those k tokens alone."""
    prompt = _ids(40)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cut = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                     truncate_prompt_tokens=15))[0]
    alone = tiny_llm.generate([prompt[-15:]], params)[0]
    full = tiny_llm.generate([prompt], params)[0]
    assert cut.prompt_token_ids == prompt[-15:]
    assert cut.outputs[0].token_ids == alone.outputs[0].token_ids != full.outputs[0].token_ids


def test_truncation_leaves_a_shorter_prompt_alone(tiny_llm):
    """A prompt of at most k tokens is not changed."""
    prompt = _ids(10, seed=1)
    out = tiny_llm.generate([prompt], SamplingParams(max_tokens=2, truncate_prompt_tokens=10))[0]
    assert out.prompt_token_ids == prompt


def test_truncation_admits_a_prompt_longer_than_n_ctx(tiny_llm):
    """A 300-token prompt is refused on a model with n_ctx 128, but truncated to 100 it runs."""
    prompt = _ids(300, seed=2)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        tiny_llm.generate([prompt], SamplingParams(max_tokens=4))
    out = tiny_llm.generate([prompt], SamplingParams(max_tokens=4, truncate_prompt_tokens=100))[0]
    assert out.prompt_token_ids == prompt[-100:] and len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_truncation_rejects_values_that_are_not_a_positive_int(bad):
    """truncate_prompt_tokens is None or an int >= 1; anything else names the field."""
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=bad)


# ---- context shifting -----------------------------------------------------------------------
N_CTX, WINDOW, BS = 64, 24, 8


@pytest.fixture(scope="module")
def short_hf():
    from conftest import make_hf_model
    return make_hf_model(seed=3, n_positions=N_CTX)


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory, short_hf):
    from conftest import save_checkpoint
    return save_checkpoint(short_hf, tmp_path_factory.mktemp("short") / "hub")


def _shifting(ckpt, **kw) -> LLM:
    return LLM(str(ckpt), device="cpu", quiet=True, block_size=BS, context_overflow="shift",
               shift_window=WINDOW, **kw)


def _band_mask(T: int, window: int):
    """(1, 1, T, T) additive mask: token i attends to tokens i-window+1 .. i only."""
    import torch
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)     # (T, T)
    return torch.zeros(T, T).masked_fill(~band, float("-inf"))[None, None]


def _hf_shifted_greedy(hf, prompt: list[int], n: int, attention_window: int | None = None
                       ) -> tuple[list[int], list[float], int]:
    """The oracle: Hugging Face's GPT-2 fed each context from scratch (no cache), under a band
    mask if attention_window is set; whenever the context passes n_ctx it becomes its last
    WINDOW tokens. Returns the n greedy tokens, their logprobs, and the number of shifts."""
    import torch
    ctx, out, lps, shifts = list(prompt), [], [], 0
    with torch.no_grad():
        for _ in range(n):
            mask = None if attention_window is None else _band_mask(len(ctx), attention_window)
            lp = hf(torch.tensor([ctx]), attention_mask=mask).logits[0, -1].log_softmax(-1)     # (V,)
            out.append(int(lp.argmax()))
            lps.append(float(lp.max()))
            ctx.append(out[-1])
            if len(ctx) > N_CTX and len(out) < n:
                ctx, shifts = ctx[-WINDOW:], shifts + 1
    return out, lps, shifts


def test_after_a_shift_tokens_equal_hf_greedy_on_the_kept_window(short_ckpt, short_hf):
    """With n_ctx 64, a 20-token prompt and 150 new tokens cross n_ctx several times; every
    token, before and after each shift, equals HF's greedy continuation of the same kept window
    fed from scratch, and each shift is counted in the request's metrics and in get_stats()."""
    prompt = _ids(20, seed=7)
    llm = _shifting(short_ckpt, num_blocks=32)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))[0]
    ref, _, shifts = _hf_shifted_greedy(short_hf, prompt, 150)
    assert shifts >= 3
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].finish_reason == "length"
    assert out.metrics.num_shifts == shifts == llm.engine.get_stats()["num_shifts"]


def test_a_long_generation_holds_at_most_one_context_of_blocks(short_ckpt):
    """A 5 x n_ctx generation never holds more than cdiv(n_ctx, block_size) blocks, and all of
    them come back at the end."""
    llm = _shifting(short_ckpt, num_blocks=32)
    eng = llm.engine
    eng.add_request("long", _ids(10, seed=8), SamplingParams(temperature=0, max_tokens=5 * N_CTX, ignore_eos=True))
    most = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        most = max(most, eng.get_stats()["num_blocks_used"])
    assert most == N_CTX // BS
    assert outs[0].metrics.num_kv_blocks_peak == N_CTX // BS
    assert len(outs[0].outputs[0].token_ids) == 5 * N_CTX
    assert eng.allocator.num_free == 32


def test_shifting_batched_and_preempted_gives_each_request_its_alone_tokens(short_ckpt, short_hf):
    """Shifting requests batched with short ones in a pool too small for them all (so sequences
    are preempted) produce the tokens of HF's shifted oracle; no block leaks."""
    prompts = [_ids(n, seed=10 + n) for n in (5, 30, 64, 12, 40)]
    max_tokens = [120, 8, 90, 3, 60]
    llm = _shifting(short_ckpt, num_blocks=12, max_num_batched_tokens=32)
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                        use_tqdm=False)
    assert llm.engine.get_stats()["num_preemptions"] > 0, "the test should exercise preemption"
    for p, m, o in zip(prompts, max_tokens, outs):
        ref, _, shifts = _hf_shifted_greedy(short_hf, p, m)
        assert o.outputs[0].token_ids == ref
        assert o.metrics.num_shifts == shifts
    assert llm.engine.allocator.num_free == 12 and llm.engine.allocator.num_used == 0


def test_logprobs_and_stop_strings_work_across_a_shift(short_ckpt, short_hf):
    """Logprobs of tokens after a shift are those of HF on the kept window; a stop string whose
    first match comes after the first shift ends the request there, text cut before it."""
    prompt = _ids(30, seed=9)
    ref, ref_lps, _ = _hf_shifted_greedy(short_hf, prompt, 100)
    llm = _shifting(short_ckpt, num_blocks=32)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, logprobs=1))[0]
    got = out.outputs[0]
    assert [d[t] for d, t in zip(got.logprobs, got.token_ids)] == pytest.approx(ref_lps, abs=1e-4)
    assert all(len(d) <= 2 for d in got.logprobs)
    tok = llm.tokenizer
    first_shift = N_CTX + 1 - len(prompt)                  # output tokens when the context first passes n_ctx
    text_before = len(tok.decode(ref[:first_shift + 2]))
    full = tok.decode(ref)
    stop = next(s for j in range(first_shift + 2, 95) if (s := tok.decode(ref[j:j + 2])).strip()
                and full.find(s) >= text_before)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, stop=stop))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == full[:full.find(stop)]
    assert out.metrics.num_shifts >= 1


def test_shift_admits_requests_past_n_ctx_but_not_prompts_longer_than_it(short_ckpt):
    """With "shift", prompt + max_tokens may exceed n_ctx; a prompt longer than n_ctx is still
    refused, naming truncate_prompt_tokens; "error" (the default) refuses both."""
    llm = _shifting(short_ckpt, num_blocks=32)
    llm.engine.add_request("ok", _ids(60), SamplingParams(max_tokens=1000))
    llm.engine.abort_request("ok")
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate([_ids(65)], SamplingParams(max_tokens=1))
    plain = LLM(str(short_ckpt), device="cpu", quiet=True, num_blocks=32)
    with pytest.raises(ValueError, match="n_ctx=64"):
        plain.generate([_ids(60)], SamplingParams(max_tokens=10))


@pytest.mark.parametrize("kw", [dict(context_overflow="wrap"), dict(context_overflow="shift", shift_window=0),
                                dict(context_overflow="shift", shift_window=64), dict(shift_window=8)])
def test_bad_shift_settings_are_refused(short_ckpt, kw):
    """context_overflow is 'error' or 'shift'; shift_window is in [1, n_ctx), and only with 'shift'."""
    with pytest.raises(ValueError, match="context_overflow|shift_window"):
        LLM(str(short_ckpt), device="cpu", quiet=True, num_blocks=32, **kw)


# ---- sliding-window attention ---------------------------------------------------------------
def test_windowed_generation_equals_hf_under_the_same_band_mask(short_ckpt, short_hf):
    """With attention_window=7, batched prompts longer and shorter than the window, in a pool
    small enough to preempt, generate HF's greedy tokens under a band mask of 7, which differ
    from full attention's; the blocks behind each window are evicted and all come back."""
    W = 7
    prompts = [_ids(n, seed=20 + n) for n in (20, 3, 9, 14, 11, 6, 17, 2)]
    llm = LLM(str(short_ckpt), device="cpu", quiet=True, block_size=4, attention_window=W, num_blocks=13,
              max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_shifted_greedy(short_hf, p, 30, attention_window=W)[0]
    full = LLM(str(short_ckpt), device="cpu", quiet=True).generate(
        prompts[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert full.outputs[0].token_ids != outs[0].outputs[0].token_ids, "the window must matter"
    s = llm.engine.get_stats()
    assert s["num_evicted_blocks"] > 0 and s["num_preemptions"] > 0
    a = llm.engine.allocator
    assert a.num_free == 13 and not any(a.ref_counts), "KV blocks leaked"


def test_a_windowed_sequence_holds_about_w_tokens_of_blocks(tiny_ckpt):
    """Decoding 120 tokens with a window of 16 and blocks of 4, a sequence never holds more than
    cdiv(16, 4) + 1 blocks; the rest went back to the pool as the sequence advanced (evictions
    counted in get_stats), so the pool's usage stays flat."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, attention_window=16, num_blocks=40)
    eng = llm.engine
    eng.add_request("w", _ids(4, seed=30), SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
    used = []
    while eng.has_unfinished_requests():
        outs = eng.step()
        used.append(eng.get_stats()["num_blocks_used"])
        for seq in eng.scheduler.running:
            live = seq.block_table[seq.num_evicted_blocks:]
            assert -1 not in live and set(seq.block_table[:seq.num_evicted_blocks]) <= {-1}
    assert max(used) == 16 // 4 + 1 and outs[0].metrics.num_kv_blocks_peak == 5
    # 123 positions computed (the last token is never fed back); a query at 123 would see keys
    # from 108 on, so blocks 0..26 (positions 0..107) were evicted before the sequence finished.
    assert eng.get_stats()["num_evicted_blocks"] == (123 - 16 + 1) // 4 == 27
    assert eng.allocator.num_free == 40


def test_a_window_turns_prefix_caching_off(tiny_ckpt):
    """Prefix caching is off under a sliding window: a repeated prompt takes nothing from the
    cache."""
    llm = LLM(str(tiny_ckpt), device="cpu", quiet=True, block_size=4, attention_window=8, num_blocks=40)
    prompt = _ids(30, seed=31)
    for _ in range(2):
        llm.generate([prompt], SamplingParams(max_tokens=2))
    assert not llm.engine.scheduler.enable_prefix_caching
    assert llm.engine.get_stats()["prefix_cache_hit_rate"] == 0.0 and llm.engine.scheduler.num_cached_tokens == 0


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_bad_attention_window_is_refused(tiny_ckpt, bad):
    """attention_window is None or an int >= 1."""
    with pytest.raises(ValueError, match="attention_window"):
        LLM(str(tiny_ckpt), device="cpu", quiet=True, attention_window=bad)


def test_window_and_shifting_together_follow_the_banded_shifted_oracle(short_ckpt, short_hf):
    """A sliding window of 10 with context shifting: 3 x n_ctx tokens equal HF's greedy tokens
    under the band mask with the same shifts, and the sequence never holds more blocks than the
    recompute of a kept window needs."""
    prompt = _ids(12, seed=40)
    llm = _shifting(short_ckpt, num_blocks=32, attention_window=10)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3 * N_CTX, ignore_eos=True))[0]
    ref, _, shifts = _hf_shifted_greedy(short_hf, prompt, 3 * N_CTX, attention_window=10)
    assert out.outputs[0].token_ids == ref and out.metrics.num_shifts == shifts >= 2
    assert out.metrics.num_kv_blocks_peak == WINDOW // BS          # the recompute of the kept 24 tokens
    assert llm.engine.allocator.num_free == 32
