"""The GPU path against the CPU reference. Skipped without CUDA (run on the device machine)."""
from __future__ import annotations

import random

import pytest
import torch

from nanoserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(50256) for _ in range(rng.randint(1, 70))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def cpu_ref(tiny_ckpt):
    return LLM(str(tiny_ckpt), device="cpu", quiet=True)


def test_fp32_gpu_greedy_equals_cpu_reference(tiny_ckpt, cpu_ref):
    """Triton kernels + CUDA graphs in fp32 give the CPU reference's tokens, batched."""
    gpu = LLM(str(tiny_ckpt), device="cuda", dtype="float32", quiet=True, num_blocks=256)
    prompts = _prompts(24)
    a = gpu.generate(prompts, GREEDY, use_tqdm=False)
    b = cpu_ref.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert gpu.engine.runner.graphs, "decode steps should have used CUDA graphs"


def test_cuda_graphs_equal_eager_execution(tiny_ckpt):
    kw = dict(device="cuda", dtype="float32", quiet=True, num_blocks=256)
    prompts = _prompts(10, seed=1)
    a = LLM(str(tiny_ckpt), **kw).generate(prompts, GREEDY, use_tqdm=False)
    b = LLM(str(tiny_ckpt), enforce_eager=True, **kw).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_prompt_logprobs_stay_near_fp32(tiny_ckpt, cpu_ref, dtype):
    """fp16 prompt logprobs are within 0.02 (2e-2) of fp32's, bf16's within 0.1."""
    prompt = _prompts(1, seed=2)[0] + [5] * 30
    p = SamplingParams(max_tokens=1, prompt_logprobs=0)
    ref = cpu_ref.generate([prompt], p)[0].prompt_logprobs
    half = LLM(str(tiny_ckpt), device="cuda", dtype=dtype, quiet=True, num_blocks=256)
    got = half.generate([prompt], p)[0].prompt_logprobs
    tol = 2e-2 if dtype == "float16" else 1e-1     # bf16 keeps 8 bits of mantissa, fp16 11
    for i in range(1, len(prompt)):
        assert abs(got[i][prompt[i]] - ref[i][prompt[i]]) < tol


def test_small_pool_preemption_on_gpu_keeps_tokens(tiny_ckpt, cpu_ref):
    prompts = _prompts(16, seed=3)
    small = LLM(str(tiny_ckpt), device="cuda", dtype="float32", quiet=True, block_size=16, num_blocks=14,
                max_num_batched_tokens=64, max_num_seqs=8)
    a = small.generate(prompts, GREEDY, use_tqdm=False)
    b = cpu_ref.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert small.engine.allocator.num_free == small.engine.num_blocks
