"""The KV pool: its layout, the allocator's bookkeeping, and how many blocks it gets."""
from __future__ import annotations

import pytest
import torch

from nanoserve import kv_cache
from nanoserve.config import EngineConfig, GPT2Config
from nanoserve.kv_cache import BlockAllocator, allocate_kv_cache, auto_num_blocks, bytes_per_block
from conftest import load_model

GiB = 2**30


def test_pool_is_indexed_token_major_and_stored_head_major(tiny_ckpt):
    """pool[l, kv, block, slot, head] is one head's D-vector, and one head's BS keys of a block
    are contiguous in memory (the layout attention reads as a plain matrix)."""
    cfg = GPT2Config.from_json(tiny_ckpt / "config.json")
    pool = allocate_kv_cache(cfg, 5, 16, torch.float32, torch.device("cpu"))
    assert pool.shape == (cfg.n_layer, 2, 5, 16, cfg.n_head, cfg.head_dim)
    assert pool[0, 0, 3, :, 1].is_contiguous()                     # (BS, D) of one head
    assert pool.numel() * 4 == 5 * bytes_per_block(cfg, 16, torch.float32)


def test_allocator_refuses_more_than_it_has_and_catches_double_free():
    """allocate() names what was asked and what is free; a block freed twice is a bug."""
    alloc = BlockAllocator(4)
    ids = alloc.allocate(3)
    assert alloc.num_free == 1 and not alloc.can_allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks but only 1 are free"):
        alloc.allocate(2)
    alloc.free(ids)
    assert alloc.num_free == 4
    with pytest.raises(AssertionError, match="freed twice"):
        alloc.free(ids[:1])


def test_gpu_pool_gets_what_the_profile_run_leaves(tiny_ckpt, monkeypatch):
    """On a GPU the pool gets total * gpu_memory_utilization - the profile run's peak - memory
    other processes hold. The profile run's forward is real (on the CPU here, since CI has no
    GPU); only CUDA's memory counters are stand-ins: an 80 GiB card with 70 GiB free, 4 GiB
    reserved by us, a 3 GiB peak."""
    counters = {"mem_get_info": (70 * GiB, 80 * GiB), "max_memory_allocated": 3 * GiB,
                "memory_reserved": 4 * GiB, "empty_cache": None, "reset_peak_memory_stats": None,
                "synchronize": None}
    for name, value in counters.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, _v=value, **k: _v)
    profile = kv_cache._profile_free_gpu_memory
    monkeypatch.setattr(kv_cache, "_profile_free_gpu_memory",
                        lambda model, config, dtype, device, n: profile(model, config, dtype, torch.device("cpu"), n))
    model = load_model(tiny_ckpt)
    forwards = []
    model.register_forward_hook(lambda m, args, out: forwards.append(tuple(out.shape)))
    config = EngineConfig(model=str(tiny_ckpt), gpu_memory_utilization=0.9, block_size=16)

    num_blocks = auto_num_blocks(model, config, torch.float32, _Cuda(), max_num_batched_tokens=2500)
    left = int(80 * GiB * 0.9) - 3 * GiB - (80 - 70 - 4) * GiB
    assert num_blocks == left // bytes_per_block(model.config, 16, torch.float32)
    # the profile forward is the full step budget, split into sequences no longer than n_ctx
    assert forwards == [(2500, model.config.n_embd)] and 2500 > model.config.n_ctx


def test_pool_too_small_for_one_full_sequence_is_an_error(tiny_ckpt):
    """A budget under one n_ctx-token sequence fails at start-up, naming the settings to change."""
    model = load_model(tiny_ckpt)
    config = EngineConfig(model=str(tiny_ckpt), cpu_kv_cache_gb=1e-6, block_size=16)
    with pytest.raises(RuntimeError, match="less than one .*-token sequence.*cpu_kv_cache_gb"):
        auto_num_blocks(model, config, torch.float32, torch.device("cpu"), max_num_batched_tokens=64)


class _Cuda:
    """What auto_num_blocks reads of a CUDA device."""
    type = "cuda"
