"""Long sequences: prompt truncation (SamplingParams.truncate_prompt_tokens) and generation
past n_ctx by context shifting (EngineConfig.context_overflow="shift")."""
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


def _hf_shifted_greedy(hf, prompt: list[int], n: int) -> tuple[list[int], list[float], int]:
    """The oracle: Hugging Face's GPT-2 fed each context from scratch (no cache); whenever the
    context passes n_ctx it becomes its last WINDOW tokens. Returns the n greedy tokens, their
    logprobs, and the number of shifts."""
    import torch
    ctx, out, lps, shifts = list(prompt), [], [], 0
    with torch.no_grad():
        for _ in range(n):
            lp = hf(torch.tensor([ctx])).logits[0, -1].log_softmax(-1)     # (V,)
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


@pytest.mark.parametrize("kw", [dict(context_overflow="wrap"), dict(shift_window=0),
                                dict(context_overflow="shift", shift_window=64)])
def test_bad_shift_settings_are_refused(short_ckpt, kw):
    """context_overflow is 'error' or 'shift'; shift_window is in [1, n_ctx)."""
    with pytest.raises(ValueError, match="context_overflow|shift_window"):
        LLM(str(short_ckpt), device="cpu", quiet=True, num_blocks=32, **kw)
