"""The hand-written GPT-2 against Hugging Face's, on tiny random checkpoints (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from nanoserve import LLM, SamplingParams

PROMPT = [464, 3139, 286, 4881, 318, 6342, 13, 383, 198, 50, 1000, 7, 42, 99, 2001, 50256, 11]


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)   # (T, V)


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_ckpt_hf_layout"])
def test_prompt_logprobs_match_transformers_within_1e4(fixture, request, tiny_hf):
    """Prompt logprobs (log_softmax of raw logits) equal HF's for both checkpoint layouts."""
    llm = LLM(str(request.getfixturevalue(fixture)), device="cpu", quiet=True)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=5))[0]
    ref = _hf_logprobs(tiny_hf, PROMPT)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[PROMPT[i]] - ref[i - 1, PROMPT[i]].item()) < 1e-4
        top5 = ref[i - 1].topk(5)
        for tok, lp in zip(top5.indices.tolist(), top5.values.tolist()):
            assert abs(entry[tok] - lp) < 1e-4


def test_odd_shapes_match_transformers(odd_ckpt, odd_hf):
    """n_embd 48 with 3 heads (head_dim 16), 3 layers: logprobs and 32 greedy tokens match HF."""
    llm = LLM(str(odd_ckpt), device="cpu", quiet=True)
    out = llm.generate([PROMPT[:9]], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                    prompt_logprobs=0))[0]
    ref = _hf_logprobs(odd_hf, PROMPT[:9])
    for i in range(1, 9):
        assert abs(out.prompt_logprobs[i][PROMPT[i]] - ref[i - 1, PROMPT[i]].item()) < 1e-4
    hf_ids = odd_hf.generate(torch.tensor([PROMPT[:9]]), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=50256)[0, 9:].tolist()
    assert out.outputs[0].token_ids == hf_ids


@pytest.mark.parametrize("prompt_len", [1, 5, 17, 40])
def test_32_greedy_tokens_equal_transformers_generate(tiny_llm, tiny_hf, prompt_len):
    """Greedy decoding through the paged cache reproduces HF generate token for token."""
    prompt = (PROMPT * 3)[:prompt_len]
    ours = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    hf_ids = tiny_hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=50256)[0, prompt_len:].tolist()
    assert ours.outputs[0].token_ids == hf_ids
    assert ours.outputs[0].finish_reason == "length"


def test_generated_logprobs_match_transformers(tiny_llm, tiny_hf):
    """logprobs=k reports log_softmax of the raw logits at each generated position."""
    out = tiny_llm.generate([PROMPT[:6]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                         logprobs=3))[0].outputs[0]
    ref = _hf_logprobs(tiny_hf, PROMPT[:6] + out.token_ids)
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[5 + j]
        assert len(entry) == 3 or tok not in row.topk(3).indices.tolist()
        assert abs(entry[tok] - row[tok].item()) < 1e-4
        assert max(entry, key=entry.get) == row.argmax().item()
    assert abs(out.cumulative_logprob - sum(e[t] for t, e in zip(out.token_ids, out.logprobs))) < 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_padded_head_gives_the_same_logits_and_embeddings_without_a_copy(tiny_ckpt, tied):
    """pad_head (applied on CUDA for cuBLAS's aligned kernels) multiplies by a head of a multiple
    of 64 rows, yet compute_logits still returns num_logits columns with the unpadded values,
    the embedding lookup is unchanged, and the tied (or untied) head is a view of the padded
    tensor, not a copy."""
    from conftest import load_model
    model = load_model(tiny_ckpt)
    if not tied:
        model.lm_head = torch.nn.Parameter(torch.randn_like(model.wte.weight))
    torch.manual_seed(0)
    hidden = torch.randn(5, model.config.n_embd)
    ids = torch.tensor([0, 3, model.config.vocab_size - 1])
    want_logits, want_emb = model.compute_logits(hidden), model.wte(ids)
    model.pad_head()
    head = model.lm_head if not tied else model.wte.weight
    assert model.padded_head.shape[0] % 64 == 0 and model.padded_head.shape[0] >= model.num_logits
    assert model.padded_head.data_ptr() == head.data_ptr(), "the head should be a view of the padded rows"
    got = model.compute_logits(hidden)
    assert got.shape == (5, model.num_logits)
    torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.wte(ids), want_emb, atol=0, rtol=0)
