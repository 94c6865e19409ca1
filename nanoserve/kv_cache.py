"""The KV cache: one preallocated pool of fixed-size blocks, and the allocator that hands
blocks to sequences.

Why blocks? A sequence's length is unknown when it starts. Reserving n_ctx slots per request
wastes most of the memory (vLLM measured 60-80% waste). Instead the pool is cut into blocks of
BS tokens; a sequence holds a list of block ids (its block table) and takes one more block
only when its last one is full. Memory waste is then under one block per sequence, and a
finished or preempted sequence returns its blocks at once.

The pool is one tensor, indexed (L, 2, NB, BS, H, D): per layer, K and V, each block holding
BS tokens of H heads of D dims. In memory each block is stored head-major, (H, BS, D): one
head's BS keys are then one contiguous (BS, D) matrix, so attention over a block is a plain
matrix product on the CPU and one contiguous read on the GPU. Code indexes the logical shape
and never needs to know; the strides carry the layout. The allocator is plain Python: it
knows block ids, not tensors.

L = n_layer  NB = KV blocks in pool   BS = tokens per block   H = n_head  D = head_dim

References: vLLM `BlockSpaceManager` / `KVCacheManager`, nano-vllm `block_manager.py`.
"""
from __future__ import annotations

from collections import deque

import torch

from .config import GPT2Config


def bytes_per_block(cfg: GPT2Config, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for BS tokens: 2 * L * BS * C * element size."""
    return 2 * cfg.n_layer * block_size * cfg.n_embd * torch.finfo(dtype).bits // 8


def allocate_kv_cache(cfg: GPT2Config, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The pool: (L, 2, NB, BS, H, D), stored as (L, 2, NB, H, BS, D).

    Zero-filled: padded block-table entries point at real (finite) memory, so masked-out
    reads contribute exact zeros, never NaN from uninitialised bytes."""
    pool = torch.zeros(cfg.n_layer, 2, num_blocks, cfg.n_head, block_size, cfg.head_dim,
                       dtype=dtype, device=device)      # (L, 2, NB, H, BS, D) in memory
    return pool.transpose(3, 4)                         # (L, 2, NB, BS, H, D) to index


class BlockAllocator:
    """Free list of block ids. allocate() and free() are O(1) per block."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.is_used = [False] * num_blocks    # guards against double free / leaks in tests

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"asked for {n} KV blocks but only {len(self.free_ids)} are free")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            self.is_used[i] = True
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            assert self.is_used[i], f"block {i} freed twice"
            self.is_used[i] = False
            self.free_ids.append(i)
