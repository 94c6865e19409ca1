"""The sampler's filters and seeds, on hand-made logits."""
from __future__ import annotations

import pytest
import torch

from nanoserve.sampler import Sampler
from nanoserve.sequence import SamplingParams, Sequence

V = 50


def _seq(params: SamplingParams, output: list[int] | None = None, prompt: list[int] | None = None) -> Sequence:
    return Sequence(seq_id=0, request_id="r", index=0, prompt_token_ids=prompt or [1],
                    params=params, output_token_ids=output or [])


def _sampler(seed: int = 0) -> Sampler:
    return Sampler(V, eos_token_id=V - 1, device=torch.device("cpu"), seed=seed)


def _logits(rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(0)) * 3


def _draws(params: SamplingParams, n: int = 400, logits: torch.Tensor | None = None) -> set[int]:
    s = _sampler()
    logits = _logits() if logits is None else logits
    seqs = [_seq(params)] * n
    return set(s(logits.expand(n, V).clone(), seqs).token_ids.tolist())


def test_greedy_is_argmax():
    logits = _logits(4)
    out = _sampler()(logits.clone(), [_seq(SamplingParams(temperature=0))] * 4)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_draws_only_the_k_best():
    top3 = set(_logits()[0].topk(3).indices.tolist())
    drawn = _draws(SamplingParams(temperature=5.0, top_k=3))
    assert drawn <= top3 and len(drawn) == 3


def test_top_p_draws_only_the_nucleus():
    logits = _logits() / 3
    probs = logits[0].softmax(-1)
    sp, idx = probs.sort(descending=True)
    nucleus = set(idx[: int((sp.cumsum(0) < 0.6).sum()) + 1].tolist())
    drawn = _draws(SamplingParams(temperature=1.0, top_p=0.6), logits=logits)
    assert drawn <= nucleus and len(drawn) >= 2


def test_min_p_drops_unlikely_tokens():
    logits = _logits()
    probs = logits[0].softmax(-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero()[:, 0].tolist())
    assert _draws(SamplingParams(temperature=1.0, min_p=0.2), logits=logits) <= allowed


def _three_tokens() -> torch.Tensor:
    """Logits whose softmax is 0.5, 0.3, 0.2 on tokens 0, 1, 2 and ~0 elsewhere."""
    logits = torch.full((1, V), -1e4)
    logits[0, :3] = torch.tensor([0.5, 0.3, 0.2]).log()
    return logits


@pytest.mark.parametrize("top_p, kept", [(0.45, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_token_that_reaches_top_p_and_drops_the_next(top_p, kept):
    """Top-p keeps the most likely tokens up to and including the one whose probability
    carries the running total to top_p. With 0.5, 0.3, 0.2: top_p 0.55 keeps token 1 (0.5
    before it is short of 0.55) and drops token 2 (0.8 before it is past 0.55)."""
    assert _draws(SamplingParams(temperature=1.0, top_p=top_p), logits=_three_tokens()) == kept


@pytest.mark.parametrize("min_p, kept", [(0.35, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0})])
def test_min_p_drops_exactly_the_tokens_below_min_p_times_the_top_one(min_p, kept):
    """Min-p's threshold is relative to the most likely token (0.5 here): min_p 0.5 keeps
    token 1 (0.3 >= 0.25) and drops token 2 (0.2 < 0.25); 0.35 keeps both (0.175)."""
    assert _draws(SamplingParams(temperature=1.0, min_p=min_p), logits=_three_tokens()) == kept


def test_same_seed_same_tokens_regardless_of_batch_position():
    """A seeded row's draw depends on its own generator only, not on its neighbours."""
    p = SamplingParams(temperature=1.0, seed=42)
    logits = _logits(3)

    def draw(rows: list[int], seeded_row: int) -> int:
        s = _sampler(seed=len(rows))                     # a different shared generator each time
        seqs = [_seq(SamplingParams(temperature=1.0)) for _ in rows]
        seqs[seeded_row] = _seq(p)
        seqs[seeded_row].generator = s.make_generator(42)
        return s(logits[rows].clone(), seqs).token_ids[seeded_row].item()

    assert draw([2], 0) == draw([0, 1, 2], 2) == draw([2, 0], 0)


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.9
    s = _sampler()
    plain = s(logits.clone(), [_seq(SamplingParams(temperature=0))]).token_ids.item()
    penalised = s(logits.clone(), [_seq(SamplingParams(temperature=0, repetition_penalty=1.5),
                                        prompt=[3])]).token_ids.item()
    assert plain == 3 and penalised == 4


def test_frequency_penalty_counts_uses_and_presence_penalty_does_not():
    """OpenAI's penalties, on output tokens only: token 3 (logit 2.0) was generated twice, token
    4 has 1.5. frequency 0.3 takes 2 x 0.3 = 0.6 off token 3 (4 wins); presence 0.3 takes 0.3
    once (3 still wins); the same token in the prompt only is not penalised."""
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    s = _sampler()
    pick = lambda seq: s(logits.clone(), [seq]).token_ids.item()
    assert pick(_seq(SamplingParams(temperature=0, frequency_penalty=0.3), output=[3, 3])) == 4
    assert pick(_seq(SamplingParams(temperature=0, presence_penalty=0.3), output=[3, 3])) == 3
    assert pick(_seq(SamplingParams(temperature=0, presence_penalty=0.6), output=[3, 3])) == 4
    assert pick(_seq(SamplingParams(temperature=0, frequency_penalty=2.0), prompt=[3, 3])) == 3
    assert pick(_seq(SamplingParams(temperature=0, frequency_penalty=-0.3), output=[4, 4])) == 4  # < 0 favours


def test_logit_bias_adds_to_the_chosen_tokens_only():
    """+100 makes a token certain and -100 rules one out, in any row, without touching the others."""
    logits = _logits(2)
    best, worst = logits[0].argmax().item(), logits[0].argmin().item()
    out = _sampler()(logits.clone(), [_seq(SamplingParams(temperature=0, logit_bias={worst: 100})),
                                      _seq(SamplingParams(temperature=0, logit_bias={best: -100.0}))])
    assert out.token_ids[0].item() == worst
    assert out.token_ids[1].item() == logits[1].masked_fill(torch.arange(V) == best, -1e9).argmax().item()
    drawn = _draws(SamplingParams(temperature=1.0, logit_bias={best: -100}))
    assert best not in drawn and len(drawn) > 1


def test_min_tokens_forbids_eos():
    logits = torch.zeros(1, V)
    logits[0, V - 1] = 10.0                               # EOS is by far the best
    s = _sampler()
    early = s(logits.clone(), [_seq(SamplingParams(temperature=0, min_tokens=2), output=[1])]).token_ids.item()
    later = s(logits.clone(), [_seq(SamplingParams(temperature=0, min_tokens=2), output=[1, 2])]).token_ids.item()
    assert early != V - 1 and later == V - 1


def test_logprobs_are_raw_log_softmax_before_temperature():
    logits = _logits()
    out = _sampler()(logits.clone(), [_seq(SamplingParams(temperature=0.3, top_k=2, logprobs=2))])
    ref = torch.log_softmax(logits, -1)
    tok = out.token_ids.item()
    torch.testing.assert_close(out.logprobs[0, 0], ref[0, tok])
    torch.testing.assert_close(out.logprobs[0, 1:], ref[0].topk(2).values)


def test_tiny_temperature_is_greedy_not_nan():
    """A temperature below 1e-5 (vLLM's threshold) is greedy: dividing by 1e-40 would overflow
    the logits to inf, softmax would give NaN, and every draw would be token 0. A sampled row
    beside it keeps the batch off the all-greedy fast path."""
    logits = _logits(2)
    tiny = SamplingParams(temperature=1e-40)
    assert tiny.is_greedy and not SamplingParams(temperature=1e-5).is_greedy
    out = _sampler()(logits.clone(), [_seq(tiny), _seq(SamplingParams(temperature=1.0))])
    assert out.token_ids[0].item() == logits[0].argmax().item() != 0
