"""Shared fixtures: tiny random GPT-2 checkpoints built offline with transformers.

`save_checkpoint(model, path, layout=...)` writes config.json + model.safetensors in either the
hub's unprefixed layout (with attn.bias buffers, no lm_head) or transformers' save_pretrained
layout (`transformer.` prefix, lm_head.weight). Both are what real users' directories look like.

Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU). triton.jit reads
TRITON_INTERPRET when a kernel is defined, so we set the variable here, before any test module
imports nanoserve.kernels. Tests that do not use triton are unaffected.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)
ODD = dict(n_layer=3, n_head=3, n_embd=48, n_positions=96)   # head_dim 16, 3 heads


def make_hf_model(seed: int = 0, **overrides):
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
    torch.manual_seed(seed)
    # The default init (std 0.02) gives near-uniform logits and a model that repeats one token;
    # std 0.2 gives varied greedy outputs whose top-2 logit margins are far above fp32 noise.
    cfg = HFConfig(**{"vocab_size": 50257, "initializer_range": 0.2, **TINY, **overrides})
    return GPT2LMHeadModel(cfg).eval()


def save_checkpoint(model, path: Path, layout: str = "hub") -> Path:
    """layout 'hf': save_pretrained; layout 'hub': unprefixed keys + attn.bias, no lm_head."""
    path.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        model.save_pretrained(path, safe_serialization=True)
        return path
    from safetensors.torch import save_file
    cfg = model.config
    sd = {k[len("transformer."):]: v.contiguous().clone() for k, v in model.state_dict().items()
          if k.startswith("transformer.")}
    n = cfg.n_positions
    for i in range(cfg.n_layer):   # the hub files carry these causal-mask buffers
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(sd, str(path / "model.safetensors"))
    raw = cfg.to_dict()
    raw.pop("transformers_version", None)
    (path / "config.json").write_text(json.dumps(raw))
    return path


def load_model(ckpt: Path):
    """nanoserve's GPT2 over a checkpoint directory, in eval mode on the CPU (no engine)."""
    from nanoserve.config import GPT2Config
    from nanoserve.model import GPT2
    from nanoserve.weights import load_state_dict
    cfg = GPT2Config.from_json(ckpt / "config.json")
    model = GPT2(cfg)
    model.load_weights(load_state_dict(ckpt, cfg))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf():
    return make_hf_model()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_hf) -> Path:
    return save_checkpoint(tiny_hf, tmp_path_factory.mktemp("tiny") / "hub", layout="hub")


@pytest.fixture(scope="session")
def tiny_ckpt_hf_layout(tmp_path_factory, tiny_hf) -> Path:
    return save_checkpoint(tiny_hf, tmp_path_factory.mktemp("tiny") / "hf", layout="hf")


@pytest.fixture(scope="session")
def odd_hf():
    return make_hf_model(seed=1, **ODD)


@pytest.fixture(scope="session")
def odd_ckpt(tmp_path_factory, odd_hf) -> Path:
    return save_checkpoint(odd_hf, tmp_path_factory.mktemp("odd") / "hub", layout="hub")


@pytest.fixture(scope="session")
def tiny_llm(tiny_ckpt):
    from nanoserve import LLM
    return LLM(str(tiny_ckpt), device="cpu", quiet=True)


# ---- CPU decode steps (test_cpu_step.py, test_fused.py) -------------------------------------
def decode_step_vs_eager(llm, ctx: int = 37, pool: torch.Tensor | None = None, token: int = 4881):
    """One decode step at context ctx over a random pool (or `pool`), the context's blocks in a
    scrambled order, run by llm's fused CPU step (runner.cpu_decode, given the host lists the
    runner gives it) and by the eager forward on copies of the pool: (pool, (logits, pool after)
    eager, (logits, pool after) fused). The slot the step writes holds 1e4 before, which no K/V
    value equals, so every write shows."""
    from nanoserve.attention import AttentionMetadata
    model, BS = llm.engine.model, llm.engine.config.block_size
    if pool is None:
        pool = torch.randn(llm.engine.kv_cache.shape, generator=torch.Generator().manual_seed(ctx))
        pool = pool.to(llm.engine.kv_cache.dtype)                                # (L, 2, NB, BS, H, D)
    table = [3, 0, 7, 1, 9, 2, 5, 4, 11, 6][:-(-ctx // BS)]
    last = table[(ctx - 1) // BS] * BS + (ctx - 1) % BS
    pool = pool.clone()
    pool[:, :, last // BS, last % BS] = 1e4
    meta = AttentionMetadata(slot_mapping=torch.tensor([last]), block_tables=torch.tensor([table], dtype=torch.int32),
                             context_lens=torch.tensor([ctx], dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 1], dtype=torch.int32), max_query_len=1,
                             max_context_len=ctx)
    ids, positions = torch.tensor([token]), torch.tensor([ctx - 1])
    with torch.inference_mode():
        kv_eager, kv_step = pool.clone(), pool.clone()
        eager = model.compute_logits(model(ids, positions, kv_eager, meta)).float()          # (1, V)
        step = llm.engine.runner.cpu_decode([token], [ctx - 1], [last], [ctx], [table], kv_step, False)   # (1, V)
    return pool, (eager, kv_eager), (step, kv_step)


def greedy_with_logprobs(llm, prompts: list[list[int]], max_tokens: int = 24) -> list[tuple[list[int], torch.Tensor]]:
    """Each prompt's greedy tokens and the logprob of each (every step's logits, in effect)."""
    from nanoserve import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outs = [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]
    return [(o.token_ids, torch.tensor([lp[t] for lp, t in zip(o.logprobs, o.token_ids)])) for o in outs]


def count_cpu_decode_calls(llm) -> list[int]:
    """Make llm's fused CPU step record each call's sequence count in the returned list."""
    calls, step = [], llm.engine.runner.cpu_decode
    llm.engine.runner.cpu_decode = lambda *a: calls.append(len(a[0])) or step(*a)
    return calls
