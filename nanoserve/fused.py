"""The fused decode step: torch.compile of model.py's forward, for CUDA graphs and for the CPU.

At batch 1 a GPT-2 decode step is hundreds of tiny kernels (per layer: layer norm, a GEMM with
its bias, the K/V write, attention, a GEMM, a residual add, layer norm, a GEMM, GELU, a GEMM,
an add), and on an H200 the gaps between them cost more than their work. We do not write a
second GPT-2 for speed. We hand the same `GPT2.forward` to torch.compile, which fuses what lies
between the GEMMs: the residual add with the next layer norm, each bias with the GELU or add
after it. GEMMs stay with cuBLAS.

Inductor cannot see inside our Triton attention kernels, and must not try to: they gather
through block tables, take their lengths from device tensors, and write the KV cache in place.
So each one becomes a custom op (torch.library.custom_op), an opaque call in the compiled graph
with a declared effect: `decode_attention` writes the step's K/V into the cache views it is
given, which Inductor keeps in place (no copy of the pool), and returns its output as a new
tensor. On CUDA, for small batches (split-K decode), one kernel does both: the K/V write rides
in the attention kernel, one launch per layer less (kernels.paged_attention's new_kv);
elsewhere attention.py's reference does, so CPU tests exercise the same compiled graph.
(`write_kv`, the write alone as an op, serves the CPU's compiled step where cpu_gemv.py's C++
write is not built.)

The runner calls the compiled function only while capturing its decode CUDA graphs (one per
batch size); replays never enter Python, so Inductor's wrapper costs nothing per step. Batch
size is a dynamic dimension: one compilation serves every graph size but 1, which torch
always specialises (a second, short compilation).

On a CPU (compile_cpu_decode, below, with `EngineConfig(fused_decode=True)`) the same forward
is compiled for steps that decode one sequence, the case where per-op costs dominate there,
where cpu_step.py's C++ step (faster, nothing to compile) cannot run: a CPU without AVX-512
BF16 and VNNI, or no C++ compiler.

The eager path (model.py + kernels.py, no compiler) stays the reference: it runs prefill,
every step with enforce_eager, and `EngineConfig(fused_decode=False)`; on a CPU also batched
decode steps, and every step where neither CPU step (C++ or compiled) runs.

S = sequences (= tokens: one each)   H = n_head   D = head_dim   V = vocab_size
NB = KV blocks in pool   BS = tokens per block   MB = max blocks per sequence

References: gpt-fast (torch.compile of a decode step under CUDA graphs), PyTorch's custom-op
tutorial ("Python custom operators"), vLLM's `unified_attention` custom op,
torch/_inductor/freezing.py (what freezing does to weights).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import attention, cpu_attention, cpu_gemv, kernels
from .attention import AttentionMetadata
from .config import cdiv
from .model import GPT2

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
# A CPU's decode step (compile_cpu_decode below, cpu_step.build) takes the step as the runner
# has it on the host: token ids, positions, cache slots, context lengths and block tables, one
# per sequence, then the KV pool and `greedy`; it returns (S, V) logits, or with greedy=True
# each row's argmax (S,). Host lists, not tensors: on a CPU each small tensor operation costs
# ~20 us once a decode step's stream of weights has flushed the caches (~0.3 ms a token).
CpuDecodeFn = Callable[[list[int], list[int], list[int], list[int], list[list[int]], torch.Tensor, bool], torch.Tensor]


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and kernels.HAS_TRITON


@torch.library.custom_op("nanoserve::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """attention.write_kv as an op: (S, H, D) K/V rows into their slots of (NB, BS, H, D)."""
    (kernels if _use_triton(k) else attention).write_kv(k, v, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("nanoserve::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                     window: int) -> torch.Tensor:
    """Write this step's K/V (S, H, D) into their slots, then attend from each sequence's one
    query to its cached keys: (S, H, D) -> (S, H, D), a new tensor. On CUDA, kernels.py
    (whose split-K kernel does both in one launch, see paged_attention's new_kv).
    window: EngineConfig.attention_window, or 0 for none (a custom op takes no Optional int)."""
    # A decode step's metadata, rebuilt from tensors (a custom op takes no dataclasses). The
    # Triton kernel reads lengths on the device; the reference needs a host-side bound on the
    # context, and the block table's width is one that never syncs.
    meta = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens,
                             query_start_loc=query_start_loc, max_query_len=1,
                             max_context_len=block_tables.shape[1] * k_cache.shape[1],
                             attention_window=window or None)
    if _use_triton(q):
        return kernels.paged_attention(q, k_cache, v_cache, meta, scale, new_kv=(k, v))
    attention.write_kv(k, v, k_cache, v_cache, slot_mapping)
    return attention.paged_attention(q, k_cache, v_cache, meta, scale)


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, query_start_loc, scale, window):
    return q.new_empty(q.shape)        # the shape and dtype Inductor plans the graph with


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, new_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """model.py's AttentionFn, over the custom op (which also writes new_kv)."""
    return decode_attention(q, *new_kv, k_cache, v_cache, meta.slot_mapping, meta.block_tables, meta.context_lens,
                            meta.query_start_loc, scale, meta.attention_window or 0)


def compile_decode(model: GPT2) -> DecodeFn:
    """A compiled decode step: (S,) token ids at (S,) positions -> (S, V) logits.

    It writes this step's K/V into kv_cache, as the eager forward does. Compilation happens on
    the first call (seconds for GPT-2 124M, longer for XL), so call it outside CUDA graph capture
    first, as the runner's warm-up does.
    """
    def decode_logits(input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        hidden = model(input_ids, positions, kv_cache, meta, attn_fn=_attention, attn_writes_kv=True)   # (S, C)
        return model.compute_logits(hidden)                                                          # (S, V)

    # Each engine compiles afresh. Every engine's decode_logits shares one code object, so
    # Dynamo would hand a second engine the first one's compiled artifact (same shapes, guards
    # pass); on an H200 that gave wrong tokens once the first engine's CUDA graphs were gone
    # (tests/test_gpu.py, 2026-11-30). The reset costs other torch.compile'd functions in this
    # process a recompilation on their next call; captured CUDA graphs do not notice.
    torch.compiler.reset()
    compiled = torch.compile(decode_logits, fullgraph=True)

    def run(input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        # Only the batch dimension varies between graph sizes. Marking just it (not
        # dynamic=True, which would make every weight's shape symbolic too) keeps sizes such as
        # n_embd static, so Inductor can unroll a layer norm into one persistent reduction.
        for t in (input_ids, positions, meta.slot_mapping, meta.block_tables, meta.context_lens,
                  meta.query_start_loc):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(input_ids, positions, kv_cache, meta)
    return run


# ---- the CPU: one sequence's decode step, compiled --------------------------------------
# At batch 1 a CPU decode step is ~250 small eager ops around 49 matrix-vector products; each
# op costs 3-40 us of dispatch whatever its size. Compiled, the layer norms, GELU, residual
# adds and attention become a few C++ loops between the products. The products are
# cpu_gemv.py's AVX-512 ops where the CPU has them (opaque custom ops in the graph, as fast
# compiled as eager); elsewhere in float32 Inductor's own loops (linear.gemv), which stream
# the weights faster than oneDNN's kernel does for one row, and oneDNN's kernels for bf16 and
# int8 weights (whose per-token quantization then fuses into one loop). There are no CUDA
# graphs on a CPU: Inductor's Python wrapper runs every step, behind TorchDynamo's guards.
#
# With freezing, Inductor treats the weights as constants, which lets oneDNN's packed bf16 and
# int8 weights (linear.py) stay in the graph as its own mkldnn ops. The K/V write stays an
# opaque op (cpu_gemv's C++ write_kv_one where it is built, else the write_kv op above): written
# as an index assignment in the graph (gpt-fast's way), it compiled to a copy of each layer's
# whole K and V pool per step (our pool is head-major).
# Only one-sequence steps take this path: batched steps already share each op's cost among
# their sequences, and the eager oneDNN kernels are the faster ones there.

def _cpu_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """The step's one K/V row into the cache: cpu_gemv's C++ op where it is built (the write_kv
    op above runs attention.write_kv through Python, ~40 us a layer), else that op."""
    if cpu_gemv.is_available():
        torch.ops.nanoserve_cpu.write_kv_one(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv(k, v, k_cache, v_cache, slot_mapping)


def _cpu_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                   scale: float) -> torch.Tensor:
    """cpu_attention's fused decode loop; meta.block_tables holds just the used blocks."""
    return cpu_attention.fused_decode_attention(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                                meta.block_tables, meta.context_lens, scale)   # (1, H, D)


def compile_cpu_decode(model: GPT2) -> CpuDecodeFn:
    """A compiled one-sequence decode step for the CPU (a CpuDecodeFn: the step's host lists
    -> (1, V) logits, or its argmax), writing the step's K/V into kv_cache like the eager
    forward. No sliding window.

    Compilation happens on the first call: 13-84 s for GPT-2 124M, 5-25 s for the tests' tiny
    models (Inductor caches its work on disk, so a second process compiles faster). Later calls recompile only for a
    new shape: the context is a dynamic dimension, so they do not.
    """
    def decode_logits(input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, blocks: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        # Only the fields the two functions above read; the rest are fixed for a decode step.
        meta = AttentionMetadata(slot_mapping, blocks, context_lens, query_start_loc=context_lens,
                                 max_query_len=1, max_context_len=0)
        hidden = model(input_ids, positions, kv_cache, meta, attn_fn=_cpu_attention, write_fn=_cpu_write_kv)
        return model.compute_logits(hidden)                                             # (1, V)

    torch.compiler.reset()      # as compile_decode: each engine compiles its own weights
    compiled = torch.compile(decode_logits, fullgraph=True)

    def run(tokens: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]], kv_cache: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        assert len(tokens) == 1, "one sequence"
        BS = kv_cache.shape[3]
        # The blocks that hold the context, at least two: torch specialises a size of 1, and a
        # second compilation for contexts of one block would cost more than attending to a
        # zero-filled block (masked out by context_lens) for a few steps.
        nb = max(2, cdiv(context_lens[0], BS))
        table = block_tables[0][:nb]
        blocks = torch.tensor([table + [0] * (nb - len(table))])                        # (1, nb)
        torch._dynamo.maybe_mark_dynamic(blocks, 1)
        # Freezing is read when a call compiles (torch.compile's options= do not reach it).
        with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
            logits = compiled(torch.tensor(tokens), torch.tensor(positions), kv_cache, torch.tensor(slots), blocks,
                              torch.tensor(context_lens))                               # (1, V)
        return logits.argmax(dim=-1) if greedy else logits
    return run
