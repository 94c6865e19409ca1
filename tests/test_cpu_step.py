"""cpu_step.cpp's one-token C++ step against model.py's eager forward, on the CPU.

Tolerances: in float32 the step is model.py's arithmetic with sums in another order (logits and
K/V within 1e-4). int8 quantizes the same products' inputs as the eager forward does (1e-4
too). bf16 rounds them the same way, but the C++ step keeps activations in float32 where the
eager bf16 forward rounds every op's output to bf16: a few bf16 steps at |logit| ~ 8 (0.25, as
test_fused). Against the float32 reference: logits within 5% (bf16) and 2% (int8) of their norm.

Skipped only on a CPU without AVX-512 BF16 and VNNI, where the step is not built."""
from __future__ import annotations

import pytest
import torch

from nanoserve import LLM, SamplingParams, cpu_gemv, cpu_step
from nanoserve.attention import AttentionMetadata

from conftest import count_cpu_decode_calls, decode_step_vs_eager, greedy_with_logprobs

pytestmark = pytest.mark.skipif(not cpu_gemv.cpu_has_instructions(), reason="CPU lacks AVX-512 BF16 / VNNI")

PROMPT = [464, 3139, 286, 4881, 318, 6342, 13, 383, 198, 50, 1000, 7, 42, 99, 2001, 50256, 11]
MODES = {"float32": dict(), "bfloat16": dict(dtype="bfloat16"), "int8": dict(quantization="int8"),
         "bf16-int8": dict(dtype="bfloat16", quantization="int8")}
TOL = {"float32": 1e-4, "bfloat16": 0.25, "int8": 1e-4, "bf16-int8": 0.25}     # against eager, same mode
REL = {"float32": 1e-6, "bfloat16": 0.05, "int8": 0.02, "bf16-int8": 0.05}     # against float32, of the norm


def _engine(ckpt, **kw) -> LLM:
    return LLM(str(ckpt), device="cpu", quiet=True, enable_prefix_caching=False, num_blocks=16, **kw)


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return {mode: _engine(tiny_ckpt, **kw) for mode, kw in MODES.items()}


def test_a_cpu_engine_uses_the_step_by_default_and_not_when_told(tiny_ckpt, engines):
    """By default (and with fused_decode=True) a CPU engine with cpu_gemv runs one-sequence
    decode steps in C++; fused_decode=False or enforce_eager=True keep model.py for them."""
    assert all(llm.engine.runner.cpu_decode is not None for llm in engines.values())
    assert _engine(tiny_ckpt, fused_decode=True).engine.runner.cpu_decode is not None
    assert _engine(tiny_ckpt, fused_decode=False).engine.runner.cpu_decode is None
    assert _engine(tiny_ckpt, enforce_eager=True).engine.runner.cpu_decode is None


@pytest.mark.parametrize("ctx", [1, 16, 37, 128])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_step_gives_the_eager_forwards_logits_and_kv_writes(engines, mode, ctx):
    """Over a random pool with a scrambled block table, at contexts of one token, one full
    block, a partial block and n_ctx, the C++ step gives the eager forward's logits and writes
    the same K/V to the same slot, and nothing else of the pool changes."""
    pool, (eager, kv_eager), (step, kv_step) = decode_step_vs_eager(engines[mode], ctx)
    assert step.dtype == torch.float32 and step.shape == eager.shape
    torch.testing.assert_close(step, eager, atol=TOL[mode], rtol=0)
    written = kv_eager != pool
    assert written.any() and torch.equal(kv_step != pool, written)
    torch.testing.assert_close(kv_step.float(), kv_eager.float(), atol=TOL[mode], rtol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_step_is_close_to_the_float32_reference(engines, mode):
    """Each mode's step against the float32 eager forward over the same pool (the mode's cache
    dtype, widened): logits within REL of their norm."""
    pool, _, (step, _) = decode_step_vs_eager(engines[mode])
    _, (reference, _), _ = decode_step_vs_eager(engines["float32"], pool=pool.float())
    rel = ((step - reference).norm() / reference.norm()).item()
    assert rel < REL[mode], f"{mode}: {rel:.4f} of the norm"


@pytest.mark.parametrize("shape", [dict(n_layer=1, n_head=2, n_embd=40), dict(n_layer=2, n_head=3, n_embd=96)])
@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
def test_head_sizes_that_are_not_a_vector_and_both_gelus(tmp_path, shape, act):
    """head_dim 20 (masked vector tails), 32, and the erf GELU: the step equals the eager forward."""
    from conftest import make_hf_model, save_checkpoint
    ckpt = save_checkpoint(make_hf_model(seed=2, activation_function=act, **shape), tmp_path / "m", layout="hub")
    _, (eager, kv_eager), (step, kv_step) = decode_step_vs_eager(_engine(ckpt), ctx=40)
    assert _engine(ckpt).engine.runner.cpu_decode is not None
    torch.testing.assert_close(step, eager, atol=1e-4, rtol=0)
    torch.testing.assert_close(kv_step, kv_eager, atol=1e-5, rtol=0)


def test_float32_greedy_tokens_and_logprobs_equal_the_eager_engines(tiny_ckpt):
    """A request decoded by the C++ step (every step after its prompt's, across block
    boundaries) gets the eager engine's greedy tokens, each logprob within 1e-4."""
    llm, eager = _engine(tiny_ckpt), _engine(tiny_ckpt, fused_decode=False)
    calls = count_cpu_decode_calls(llm)
    [(tokens, lps)] = greedy_with_logprobs(llm, [PROMPT], 40)
    [(eager_tokens, eager_lps)] = greedy_with_logprobs(eager, [PROMPT], 40)
    assert len(calls) == len(tokens) - 1
    assert tokens == eager_tokens
    torch.testing.assert_close(lps, eager_lps, atol=1e-4, rtol=0)


def test_steps_of_up_to_8_sequences_run_in_cpp_with_the_eager_tokens(tiny_ckpt):
    """Three requests of different lengths decode together through the C++ step (steps of 3,
    then fewer as they finish), each with the eager engine's greedy tokens, logprobs within 1e-4."""
    llm, eager = _engine(tiny_ckpt), _engine(tiny_ckpt, fused_decode=False)
    calls = count_cpu_decode_calls(llm)
    prompts = [PROMPT, PROMPT[:9], PROMPT[:4]]
    sp = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in (20, 12, 6)]
    for a, b in zip(llm.generate(prompts, sp, use_tqdm=False), eager.generate(prompts, sp, use_tqdm=False)):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor([lp[t] for lp, t in zip(a.logprobs, a.token_ids)]),
                                   torch.tensor([lp[t] for lp, t in zip(b.logprobs, b.token_ids)]), atol=1e-4, rtol=0)
    assert max(calls) == 3 and set(calls) == {1, 2, 3}


@pytest.mark.parametrize("case", ["all equal", "a tie past 0", "NaNs"])
def test_the_steps_argmax_picks_as_torch_argmax(engines, case):
    """greedy=True returns torch.argmax of the logits the step computes: the first of equal
    maxima, and the first NaN if there is one. The head's packed weights are set so that its
    logits tie (all rows zero; all zero but two equal rows) or hold NaNs."""
    llm = engines["float32"]
    head = llm.engine.model.fast_head
    saved, wp = head.gemv_weight.clone(), head.gemv_weight           # (O/16, K, 16, 1): output o at [o // 16, :, o % 16]
    w = torch.randn(wp.shape[1], generator=torch.Generator().manual_seed(0))

    def step(greedy: bool) -> torch.Tensor:
        return llm.engine.runner.cpu_decode([4881], [20], [5 * 16 + 4], [21], [[2, 5, 1]],
                                            torch.zeros_like(llm.engine.kv_cache), greedy)
    try:
        if case == "NaNs":
            for o in (900, 300):
                wp[o // 16, 7, o % 16, 0] = float("nan")
        else:
            wp.zero_()
        if case == "a tie past 0":
            for sign in (1, -1):                         # rows 700 and 5000 above the zeros
                for o in (700, 5000):
                    wp[o // 16, :, o % 16, 0] = sign * w
                if step(False)[0, 700] > 0:
                    break
        logits, ids = step(False), step(True)
    finally:
        wp.copy_(saved)
    want = {"all equal": 0, "a tie past 0": 700, "NaNs": 300}[case]
    assert case != "a tie past 0" or logits[0, 700] == logits[0, 5000] > logits[0, 0] == 0
    assert logits.argmax(dim=-1).tolist() == ids.tolist() == [want]


def test_plain_greedy_takes_the_steps_argmax_and_the_rest_the_sampler(tiny_ckpt):
    """Requests that ask for nothing but temperature 0 get their tokens from the C++ step's own
    argmax (greedy=True: no logits for the sampler); a step that also holds a request with
    logprobs or a sampled one returns logits to the sampler. Both give the eager engine's
    tokens, and so does async scheduling (a token still pending comes from the previous step)."""
    llm, eager = _engine(tiny_ckpt), _engine(tiny_ckpt, fused_decode=False)
    ahead = _engine(tiny_ckpt, async_scheduling=True)
    asked, step = [], llm.engine.runner.cpu_decode
    llm.engine.runner.cpu_decode = lambda *a: asked.append(a[-1]) or step(*a)        # a[-1]: greedy
    calls = count_cpu_decode_calls(ahead)
    prompts = [PROMPT, PROMPT[:9], PROMPT[:4]]

    def tokens(engine, sp):
        return [o.outputs[0].token_ids for o in engine.generate(prompts, sp, use_tqdm=False)]
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = tokens(eager, plain)
    assert tokens(llm, plain) == want and len(asked) == 15 and all(asked)
    assert tokens(ahead, plain) == want and len(calls) == 15
    asked.clear()
    mixed = [plain, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)]
    got = tokens(llm, mixed)
    assert got == tokens(eager, mixed) and got[0] == want[0] and len(asked) == 15 and not any(asked)


def test_steps_of_more_than_8_sequences_and_windows_run_model_py(tiny_ckpt):
    """Steps that decode 9 sequences do not call the C++ step (and give the eager engine's
    tokens); nor does any step of an engine with a sliding window."""
    llm, eager = _engine(tiny_ckpt), _engine(tiny_ckpt, fused_decode=False)
    calls = count_cpu_decode_calls(llm)
    prompts = [PROMPT[:k] for k in range(4, 13)]                      # 9 prompts, 4 tokens each after
    assert [t for t, _ in greedy_with_logprobs(llm, prompts, 4)] == [t for t, _ in greedy_with_logprobs(eager, prompts, 4)]
    assert calls == []
    windowed = _engine(tiny_ckpt, attention_window=16)
    calls = count_cpu_decode_calls(windowed)
    greedy_with_logprobs(windowed, [PROMPT], 8)
    assert calls == []


@pytest.mark.parametrize("mode", list(MODES))
def test_a_step_of_four_sequences_equals_the_eager_forward(engines, mode):
    """Four sequences at contexts 1, 17, 37 and n_ctx, each in its own scrambled blocks, in one
    C++ step: the eager forward's logits and K/V writes, within TOL of the mode."""
    llm = engines[mode]
    model, BS = llm.engine.model, llm.engine.config.block_size
    ctxs = [1, 17, 37, 128]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1)).tolist()
    tables, slots = [], []
    for c in ctxs:
        tables.append([perm.pop() for _ in range(-(-c // BS))])
        slots.append(tables[-1][(c - 1) // BS] * BS + (c - 1) % BS)
    width = max(map(len, tables))
    pool = torch.randn(llm.engine.kv_cache.shape, generator=torch.Generator().manual_seed(2)).to(llm.engine.kv_cache.dtype)
    for sl in slots:
        pool[:, :, sl // BS, sl % BS] = 1e4                  # as decode_step_vs_eager: every write shows
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots),
                             block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                             context_lens=torch.tensor(ctxs, dtype=torch.int32),
                             query_start_loc=torch.arange(5, dtype=torch.int32), max_query_len=1, max_context_len=128)
    ids, positions = torch.tensor([4881, 7, 50256, 300]), torch.tensor(ctxs) - 1
    with torch.inference_mode():
        kv_eager, kv_step = pool.clone(), pool.clone()
        eager = model.compute_logits(model(ids, positions, kv_eager, meta)).float()          # (4, V)
        step = llm.engine.runner.cpu_decode(ids.tolist(), positions.tolist(), slots, ctxs, tables, kv_step, False)
        greedy = llm.engine.runner.cpu_decode(ids.tolist(), positions.tolist(), slots, ctxs, tables, pool.clone(), True)
    assert step.shape == eager.shape == (4, model.num_logits)
    torch.testing.assert_close(step, eager, atol=TOL[mode], rtol=0)
    assert greedy.dtype == torch.int64 and torch.equal(greedy, step.argmax(dim=-1))   # greedy=True: the argmax
    written = kv_eager != pool
    assert written.any() and torch.equal(kv_step != pool, written)
    torch.testing.assert_close(kv_step.float(), kv_eager.float(), atol=TOL[mode], rtol=0)


@pytest.mark.parametrize("field,value,message", [
    ("token", 50257, "token id 50257 is outside"), ("position", 128, "position 128 is outside"),
    ("block", 16, "block 16 is outside the pool's 16"), ("slot", 16 * 16, "slot 256 is outside the pool's 256"),
    ("context", 5 * 16, "context of 80 tokens does not fit a block table of 3 blocks")])
def test_bad_inputs_raise_naming_the_value_and_leave_the_pool_alone(engines, field, value, message):
    """A step given an id, position, block, slot or context outside its limits raises an error
    that names the value and the limit, before writing anything. (cpu_step.py checks before
    the C++ runs; the C++ checks the same again.)"""
    llm = engines["float32"]
    BS = llm.engine.config.block_size
    ids, pos, table, ctx = [7], [20], [2, 5, 1], 21
    slot = 5 * BS + 4
    if field == "token":
        ids = [value]
    elif field == "position":
        pos = [value]
    elif field == "block":
        table = [2, value, 1]
    elif field == "slot":
        slot = value
    else:
        ctx = value
    pool = torch.randn_like(llm.engine.kv_cache)
    before = pool.clone()
    with pytest.raises(ValueError, match=message):
        llm.engine.runner.cpu_decode(ids, pos, [slot], [ctx], [table], pool, False)
    assert torch.equal(pool, before)


def test_another_python_thread_runs_during_a_step(tmp_path):
    """The step releases the GIL (a server thread can parse requests meanwhile): a thread that
    wakes every 0.2 ms to record the time records some in the middle half of the step's calls,
    which it could not while a call held the GIL (only at their Python edges). (A model with a
    51 MB head: each step takes milliseconds.)"""
    import threading
    import time
    from conftest import make_hf_model, save_checkpoint
    llm = _engine(save_checkpoint(make_hf_model(n_embd=256, n_layer=2, n_head=4), tmp_path / "m"))
    stamps, calls, done = [], [], threading.Event()

    def record():
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.0002)
    thread = threading.Thread(target=record)
    thread.start()
    try:
        for _ in range(10):
            t0 = time.perf_counter()
            llm.engine.runner.cpu_decode([7], [20], [5 * 16 + 4], [21], [[2, 5, 1]], llm.engine.kv_cache, True)
            calls.append((t0, time.perf_counter()))
    finally:
        done.set()
        thread.join()
    inside = sum(1 for t in stamps for a, b in calls if a + (b - a) / 4 < t < b - (b - a) / 4)
    assert inside > 0, f"no timestamps inside {len(calls)} steps of {min(b - a for a, b in calls) * 1e3:.1f}+ ms"


def test_the_step_holds_the_models_weights_not_copies(engines):
    """The C++ object references the packed weights (no second copy of the model)."""
    llm = engines["int8"]
    assert cpu_step.supports(llm.engine.model)
    c_fc = llm.engine.model.h[0].mlp.c_fc
    before = c_fc.gemv_weight.clone()
    _, _, (step, _) = decode_step_vs_eager(llm)
    c_fc.gemv_weight.zero_()                      # the step must now see zero weights in that layer
    try:
        _, _, (changed, _) = decode_step_vs_eager(llm)
    finally:
        c_fc.gemv_weight.copy_(before)
    assert not torch.equal(step, changed)
    _, _, (again, _) = decode_step_vs_eager(llm)
    assert torch.equal(step, again)
