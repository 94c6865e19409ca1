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
matrix product on the CPU (cpu_attention.py) and one contiguous read on the GPU (kernels.py). Code indexes the logical shape
and never needs to know; the strides carry the layout. The allocator is plain Python: it
knows block ids, not tensors.

How many blocks? On a GPU, as many as fit: we run one forward at the full step budget with a
throwaway pool, note the peak memory, and give the pool what is left of
total * gpu_memory_utilization (vLLM's profile run). On a CPU, `cpu_kv_cache_gb`.

L = n_layer  NB = KV blocks in pool   BS = tokens per block   H = n_head  D = head_dim

References: vLLM `BlockSpaceManager` / `KVCacheManager`, nano-vllm `block_manager.py`.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from .attention import AttentionMetadata
from .config import EngineConfig, GPT2Config, cdiv


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


def auto_num_blocks(model: torch.nn.Module, config: EngineConfig, dtype: torch.dtype,
                    device: torch.device, max_num_batched_tokens: int) -> int:
    """How many blocks the pool gets when `num_blocks` is not set: cpu_kv_cache_gb on a CPU;
    on a GPU, what a full-budget forward leaves of total * gpu_memory_utilization."""
    mc, per_block = model.config, bytes_per_block(model.config, config.block_size, dtype)
    if device.type == "cpu":
        budget = int(config.cpu_kv_cache_gb * 2**30)
    else:
        budget = _profile_free_gpu_memory(model, config, dtype, device, max_num_batched_tokens)
    num_blocks = budget // per_block
    need = cdiv(mc.n_ctx, config.block_size)
    if num_blocks < need:
        raise RuntimeError(f"the KV pool would hold {num_blocks} blocks of {config.block_size} tokens, less than "
                           f"one {mc.n_ctx}-token sequence ({need} blocks); raise gpu_memory_utilization or "
                           "cpu_kv_cache_gb, or set num_blocks")
    return num_blocks


@torch.inference_mode()
def _profile_free_gpu_memory(model: torch.nn.Module, config: EngineConfig, dtype: torch.dtype,
                             device: torch.device, n_tok: int) -> int:
    """Run one forward of n_tok tokens (the step budget) with a throwaway pool, and see how
    much memory is left for KV blocks: total * gpu_memory_utilization - peak use - others' use.
    The peak holds the activations and the sampler's temporaries that every later step needs."""
    mc, BS = model.config, config.block_size
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    seq_len = min(n_tok, mc.n_ctx)
    S = cdiv(n_tok, seq_len)                          # full-length sequences fill the budget
    MB = cdiv(seq_len, BS)
    pool = allocate_kv_cache(mc, S * MB, BS, dtype, device)
    lens = [seq_len] * (S - 1) + [n_tok - seq_len * (S - 1)]
    meta = AttentionMetadata(
        slot_mapping=torch.cat([torch.arange(n) + s * MB * BS for s, n in enumerate(lens)]).to(device),
        block_tables=torch.arange(S * MB, dtype=torch.int32).view(S, MB).to(device),   # (S, MB)
        context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device),
        max_query_len=max(lens), max_context_len=max(lens))
    ids = torch.randint(0, mc.vocab_size, (n_tok,), device=device)                      # (N,)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)                         # (N,)
    hidden = model(ids, pos, pool, meta)                                                # (N, C)
    logits = model.compute_logits(hidden[: config.max_num_seqs]).float()                # (S, V)
    logits.softmax(-1).sort(-1)                         # the sampler's largest temporaries
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    del pool, hidden, logits
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    return max(0, int(total * config.gpu_memory_utilization) - peak - used_by_others)


class BlockAllocator:
    """Hands out block ids, counts the sequences holding each, and remembers full blocks by
    their contents (prefix caching). allocate(), free() and a cache lookup are O(1) per block.

    Prefix caching: once all BS tokens of a block are computed, the scheduler registers the
    block under a hash of those tokens and of every token before them (the previous block's
    hash). A later sequence whose tokens start the same way takes those blocks and skips
    computing them: a shared system prompt is prefilled once. A full block is never written
    again, so sharing it is safe; the reference count says when nobody holds it. A block
    nobody holds is free, but keeps its contents and its hash until allocate() hands it out
    again, least recently freed first, so recently used prefixes survive longest.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks                 # sequences holding each block
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.cached: dict[bytes, int] = {}                 # content hash -> block id
        self.hash_of: dict[int, bytes] = {}                # block id -> content hash
        self.peak_used = 0                                 # most blocks held at once, ever
        self.num_cached_free = 0                           # free blocks that still hold a registered prefix

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def reset_peak(self) -> None:
        """Start measuring the peak again from what is held now (benchmarks, per workload)."""
        self.peak_used = self.num_blocks - len(self.free_ids)

    def _note_peak(self) -> None:
        # Every block not in free_ids is held by some sequence: used = total - free.
        self.peak_used = max(self.peak_used, self.num_blocks - len(self.free_ids))

    @property
    def num_used(self) -> int:
        """Blocks that some sequence holds, counted from the reference counts."""
        return sum(n > 0 for n in self.ref_counts)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"asked for {n} KV blocks but only {len(self.free_ids)} are free")
        ids = []
        for _ in range(n):
            i, _ = self.free_ids.popitem(last=False)
            if (h := self.hash_of.pop(i, None)) is not None:
                del self.cached[h]                         # its contents are about to change
                self.num_cached_free -= 1
            self.ref_counts[i] = 1
            ids.append(i)
        self._note_peak()
        return ids

    def free(self, ids: list[int]) -> None:
        # Last block first: a cached prefix is only found from its start, so the tail of a
        # sequence should be the first to go.
        for i in reversed(ids):
            assert self.ref_counts[i] > 0, f"block {i} freed twice"
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self.free_ids[i] = None
                self.num_cached_free += i in self.hash_of

    def take_cached(self, hashes: list[bytes]) -> list[int]:
        """Take (hold) the blocks registered under `hashes[0]`, `hashes[1]`, ... up to the
        first one not cached; return their ids. They count as allocated until freed."""
        ids = []
        for h in hashes:
            i = self.cached.get(h)
            if i is None:
                break
            if self.ref_counts[i] == 0:
                del self.free_ids[i]
                self.num_cached_free -= 1              # a cached block always has its hash
            self.ref_counts[i] += 1
            ids.append(i)
        self._note_peak()
        return ids

    def register(self, block_id: int, h: bytes) -> None:
        """Remember that `block_id` holds the full block hashed `h` (first holder wins)."""
        if h not in self.cached and block_id not in self.hash_of:
            self.cached[h] = block_id
            self.hash_of[block_id] = h
