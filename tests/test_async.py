"""Async scheduling (engine.py): step k+1 is scheduled and launched before step k's tokens are
read back. It must change nothing a user can see: every test runs the same requests through
the synchronous engine and the async one and compares everything a RequestOutput carries. On a
CPU nothing overlaps, but the logic (pending tokens fed from the previous step's tensor, stops
checked one step late, held sequences, freed blocks) is the same as on CUDA."""
from __future__ import annotations

import random

import pytest

from nanoserve import LLM, SamplingParams

N_CTX, BS = 64, 8


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50256) for _ in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny GPT-2 with n_ctx 64, so that long generations reach the context limit."""
    from conftest import make_hf_model, save_checkpoint
    return str(save_checkpoint(make_hf_model(seed=5, n_positions=N_CTX), tmp_path_factory.mktemp("a") / "hub"))


def _run(ckpt: str, requests: list, async_scheduling: bool, **kw) -> tuple[list, int, int]:
    """Generate with the engine stepped by hand; the outputs in request order, the number of
    steps launched while another was still in flight, and the tokens run through the model."""
    llm = LLM(ckpt, device="cpu", quiet=True, block_size=BS, async_scheduling=async_scheduling, **kw)
    eng, ahead, tokens = llm.engine, [0], [0]
    real = eng.runner.launch

    def launch(sched, prev=None):
        ahead[0] += prev is not None
        tokens[0] += sched.num_tokens
        return real(sched, prev)
    eng.runner.launch = launch
    for i, (prompt, params) in enumerate(requests):
        eng.add_request(str(i), prompt, params)
    final = {}
    while eng.has_unfinished_requests():
        final |= {o.request_id: o for o in eng.step() if o.finished}
    eng.step()                       # reads back a step that ran ahead for sequences that had stopped
    assert eng.allocator.num_free == eng.num_blocks, "KV blocks leaked"
    assert not eng.scheduler.running and not eng.scheduler.waiting
    return [final[str(i)] for i in range(len(requests))], ahead[0], tokens[0]


def _visible(out) -> list:
    """Everything a user sees in a finished RequestOutput but the timings and the logprob values."""
    return [[None if d is None else sorted(d) for d in out.prompt_logprobs or []]] + [
        (c.index, c.token_ids, c.text, c.finish_reason, [sorted(d) for d in c.logprobs or []]) for c in out.outputs]


def _logprob_values(out) -> list[float]:
    return [v for d in out.prompt_logprobs or [] if d for v in d.values()] + [
        v for c in out.outputs for d in c.logprobs or [] for v in d.values()] + [
        c.cumulative_logprob for c in out.outputs if c.logprobs is not None]


def _assert_same(ckpt: str, requests: list, expect_ahead: bool = True, same_work: bool = False, **kw) -> list:
    """Async == sync for everything a user sees: the same tokens, texts, finish reasons and
    logprob keys, and logprob values within 1e-4 (holding a sequence, or a different
    preemption, changes which rows share a step, and so the last bits of a matmul's rounding);
    with same_work (requests that end only at max_tokens), no token run through the model in vain."""
    sync, ahead0, work0 = _run(ckpt, requests, False, **kw)
    got, ahead, work = _run(ckpt, requests, True, **kw)
    assert ahead0 == 0
    assert not same_work or work == work0, f"async ran {work} tokens, sync {work0}"
    assert (ahead > 0) == expect_ahead, f"{ahead} steps ran ahead"
    for a, b in zip(got, sync):
        assert _visible(a) == _visible(b)
        assert _logprob_values(a) == pytest.approx(_logprob_values(b), abs=1e-4)
    return sync


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_greedy_batch_with_chunked_prefill_and_shared_prefixes_is_unchanged(ckpt):
    """Prompts of many lengths, split into chunks by a small token budget, some sharing a
    prefix (the prefix cache), each with its own max_tokens: the same tokens and texts, and no
    extra work (a sequence whose pending token is its last is held, not run ahead)."""
    base = _ids(20, 1)
    reqs = [(base + _ids(k, k), SamplingParams(temperature=0, max_tokens=3 + 2 * k, ignore_eos=True))
            for k in range(1, 7)] + [(_ids(30, 9), GREEDY)]
    _assert_same(ckpt, reqs, same_work=True, max_num_batched_tokens=24)


def test_seeded_sampling_logprobs_and_n_are_unchanged(ckpt):
    """Seeded top-k/top-p sampling with n=2, logprobs=3 and prompt_logprobs=2: the same draws,
    the same logprobs, the same cumulative logprob."""
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=7, n=2, max_tokens=10, logprobs=3,
                       prompt_logprobs=2, ignore_eos=True)
    _assert_same(ckpt, [(_ids(9, 2), p), (_ids(17, 3), p)])


def test_stop_strings_and_stop_token_ids_found_one_step_late_are_unchanged(ckpt):
    """A stop token id and a stop string hit mid-generation: the async engine sees them one
    step late, after the next step was launched, and must drop that step's token."""
    prompt = _ids(11, 4)
    free = _run(ckpt, [(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))], False)[0][0]
    toks, text = free.outputs[0].token_ids, free.outputs[0].text
    reqs = [(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[toks[6]])),
            (prompt, SamplingParams(temperature=0, max_tokens=20, stop=[text[len(text) // 2:len(text) // 2 + 3]])),
            (prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[toks[3]], logprobs=1))]
    outs = _assert_same(ckpt, reqs)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert len(outs[0].outputs[0].token_ids) < 20


def test_preemption_in_a_small_pool_is_unchanged(ckpt):
    """Twelve requests in a 14-block pool, greedy and then seeded with n=2: sequences are
    preempted while their last token is still pending, wait, and recompute; the outputs equal
    the synchronous engine's."""
    reqs = [(_ids(5 + 3 * i, 20 + i), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) for i in range(12)]
    _assert_same(ckpt, reqs, num_blocks=14)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=11, n=2, max_tokens=20, logprobs=2, ignore_eos=True)
    _assert_same(ckpt, [(r[0], seeded) for r in reqs], num_blocks=14, max_num_seqs=8)
    llm = LLM(ckpt, device="cpu", quiet=True, block_size=BS, num_blocks=14, async_scheduling=True)
    llm.generate([r[0] for r in reqs], reqs[0][1], use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0


def test_penalties_and_min_tokens_wait_for_the_last_token(ckpt):
    """Repetition/presence/frequency penalties and min_tokens need the output so far, so such a
    step is read back before the next is scheduled; outputs are unchanged."""
    reqs = [(_ids(8, 30), SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3, ignore_eos=True)),
            (_ids(8, 31), SamplingParams(temperature=0.8, seed=3, max_tokens=10, presence_penalty=0.5,
                                         frequency_penalty=0.4, ignore_eos=True)),
            (_ids(8, 32), SamplingParams(temperature=0, max_tokens=10, min_tokens=6))]
    _assert_same(ckpt, reqs, expect_ahead=False)


def test_context_shift_and_sliding_window_are_unchanged(ckpt):
    """Generations past n_ctx (context shifting: a sequence whose pending token would sit at
    position n_ctx is held for a step, then shifted) and a sliding window (blocks evicted as
    soon as a step is launched): the same tokens as the synchronous engine."""
    reqs = [(_ids(40, 40 + i), SamplingParams(temperature=0, max_tokens=70, ignore_eos=True)) for i in range(3)]
    _assert_same(ckpt, reqs, context_overflow="shift", shift_window=24)
    reqs = [(_ids(20, 45 + i), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)) for i in range(2)]
    _assert_same(ckpt, reqs, attention_window=20, max_num_batched_tokens=16)


def test_abort_while_a_step_is_in_flight_frees_blocks_and_leaves_others_alone(ckpt):
    """Aborting a request whose step is in flight drops its result when read back; the other
    requests' tokens equal a run without it, and no block leaks."""
    reqs = [(_ids(12, 60 + i), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) for i in range(3)]
    alone = _run(ckpt, reqs[1:], False)[0]
    llm = LLM(ckpt, device="cpu", quiet=True, block_size=BS, async_scheduling=True)
    eng = llm.engine
    for i, (prompt, p) in enumerate(reqs):
        eng.add_request(str(i), prompt, p)
    for _ in range(4):
        eng.step()
    assert eng._in_flight is not None and any(s.request_id == "0" for s in eng._in_flight.sample_seqs)
    assert eng.abort_request("0").outputs[0].finish_reason == "abort"
    final = {}
    while eng.has_unfinished_requests():
        final |= {o.request_id: o for o in eng.step() if o.finished}
    eng.step()
    assert [final["1"].outputs[0].token_ids, final["2"].outputs[0].token_ids] == [o.outputs[0].token_ids for o in alone]
    assert eng.allocator.num_free == eng.num_blocks


def test_async_scheduling_without_a_kv_cache_is_refused():
    """enable_kv_cache=False recomputes whole sequences every step, which needs every token on
    the host: asking for both is an error that names them."""
    from nanoserve.config import EngineConfig
    with pytest.raises(ValueError, match="async_scheduling=True needs the KV cache"):
        EngineConfig(async_scheduling=True, enable_kv_cache=False)


def test_async_scheduling_is_on_by_default_only_on_cuda(ckpt):
    """None means: on where the device runs a step while the host works (CUDA), off on a CPU."""
    assert LLM(ckpt, device="cpu", quiet=True).engine.async_scheduling is False
    assert LLM(ckpt, device="cpu", quiet=True, async_scheduling=True).engine.async_scheduling is True


def test_a_failing_launch_still_applies_the_step_in_flight(ckpt):
    """If launching step k+1 raises (a device error), step k's tokens are still applied before
    the error propagates: no sequence is left counting a token it will never get, and the
    request goes on to the same output as an engine that never failed."""
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = _run(ckpt, [(_ids(7, 70), p)], False)[0][0]
    llm = LLM(ckpt, device="cpu", quiet=True, block_size=BS, async_scheduling=True)
    eng, real, calls = llm.engine, llm.engine.runner.launch, []

    def failing(sched, prev=None):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return real(sched, prev)
    eng.runner.launch = failing
    eng.add_request("r", _ids(7, 70), p)
    with pytest.raises(RuntimeError, match="device lost"):
        while True:
            eng.step()
    seq = eng.requests["r"].seqs[0]
    assert seq.num_pending_tokens == 0 and len(seq.output_token_ids) == 3
    final = {}
    while eng.has_unfinished_requests():
        final |= {o.request_id: o for o in eng.step() if o.finished}
    assert final["r"].outputs[0].token_ids == ref.outputs[0].token_ids


def test_a_server_on_an_async_engine_streams_what_generate_returns(ckpt):
    """The OpenAI server over an async-scheduling engine: a streamed and a plain completion
    both give LLM.generate's text (outputs arrive a step late, none is lost or repeated), and
    no KV block stays taken once the server has stopped."""
    from test_server import MODEL, _client, _in_process

    from nanoserve.config import EngineConfig
    from nanoserve.engine import LLMEngine
    prompt = _ids(9, 80)
    ref = _run(ckpt, [(prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))], False)[0][0]
    eng = LLMEngine(EngineConfig(model=ckpt, device="cpu", quiet=True, block_size=BS, async_scheduling=True))
    kw = dict(model=MODEL, prompt=prompt, max_tokens=14, temperature=0, extra_body={"ignore_eos": True})
    with _in_process(eng) as (base, _):
        client = _client(base)
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        plain = client.completions.create(**kw).choices[0].text
    assert ref.outputs[0].text and streamed == plain == ref.outputs[0].text
    assert eng.allocator.num_free == eng.num_blocks
