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
