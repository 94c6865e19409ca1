"""A decode step of one to eight sequences on the CPU as one C++ call (cpu_step.cpp).

When one sequence decodes on a CPU, the step is 49 matrix-vector products (cpu_gemv.py) and
~250 small operations between them. The products are as fast as this CPU reads memory; the
small operations are not work but overhead: microseconds of dispatch each from Python, ~1.5 ms
a step even when torch.compile fuses them (fused.compile_cpu_decode), against ~4 ms of products
for GPT-2 124M in int8. cpu_step.cpp writes model.py's forward for that one token as plain C++
loops around cpu_gemv's products, so a step costs one call from Python, as it does in
llama.cpp or llama2.c. Its arithmetic follows model.py line by line (read that first); its
activations are float32 whatever the weights' dtype. With a few sequences (up to 8, the rows
cpu_gemv's products take) the same loops run once per sequence and each product serves all of
them: the weights are still read once a step.

The engine uses it (`EngineConfig(fused_decode=True)`, or by default: see
fast_paths.set_up_decode) for steps that only decode, 1 to 8 sequences, all sampling, without a
sliding window, when every linear layer holds cpu_gemv's packed weights, i.e. on a CPU with
AVX-512 BF16 and VNNI where cpu_gemv.cpp built. Everything else runs model.py.

L = n_layer   S = sequences in the step   V = vocab_size
"""
from __future__ import annotations

import torch

from . import cpu_gemv
from .fused import CpuDecodeFn
from .model import GPT2

_NONE = torch.empty(0)              # "absent" in the Decoder's tensor list (it takes no None)
MAX_SEQS = cpu_gemv.MAX_ROWS        # sequences one step takes: the products' rows (cpu_step.cpp checks 8)


def _linear(mod: torch.nn.Module) -> tuple[list[torch.Tensor], int]:
    """A linear layer's cpu_gemv tensors (packed weights, bias, int8 scale, int8 row sums)."""
    extras = [getattr(mod, name, None) for name in ("gemv_bias", "w_scale", "row_sums")]
    is_int8 = mod.gemv_weight.dtype == torch.int8
    if not is_int8:
        extras[1:] = [None, None]
    return [mod.gemv_weight] + [_NONE if t is None else t for t in extras], mod.out_features


def supports(model: GPT2) -> bool:
    """Whether every linear layer of `model` (and its head) holds cpu_gemv's packed weights."""
    mods = [model.fast_head] + [m for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    return cpu_gemv.is_available() and all(getattr(m, "gemv_weight", None) is not None for m in mods)


def build(model: GPT2) -> CpuDecodeFn:
    """model's decode step for 1 to MAX_SEQS sequences (fused.CpuDecodeFn: the step as the
    runner's host lists -> (S, V) float32 logits, or with greedy=True each row's argmax),
    writing the step's K/V into kv_cache as model.py does. The C++ object keeps references to
    the model's tensors (no copies, except float32 copies of the layer norms' weights)."""
    assert supports(model), "cpu_step needs cpu_gemv's packed weights in every linear layer"
    cfg = model.config
    tensors, out_features = [model.wte.weight, model.wpe.weight, model.ln_f.weight, model.ln_f.bias], []

    def add(mod: torch.nn.Module) -> None:
        ts, O = _linear(mod)
        tensors.extend(ts)
        out_features.append(O)
    add(model.fast_head)
    for block in model.h:
        tensors.extend([block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias])
        for mod in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            add(mod)
    decoder = cpu_gemv.extension().Decoder([t.detach() for t in tensors], out_features, cfg.n_head,
                                           cfg.layer_norm_epsilon, cfg.activation_function != "gelu",
                                           model.h[0].attn.scale)

    vocab, n_ctx = model.wte.weight.shape[0], model.wpe.weight.shape[0]

    def step(tokens: list[int], positions: list[int], slots: list[int], context_lens: list[int],
             block_tables: list[list[int]], kv_cache: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        _check(tokens, positions, slots, context_lens, block_tables, vocab, n_ctx, kv_cache)
        return decoder.step(tokens, positions, slots, context_lens, block_tables, kv_cache, greedy)
    return step


def _check(tokens: list[int], positions: list[int], slots: list[int], context_lens: list[int],
           block_tables: list[list[int]], vocab: int, n_ctx: int, kv_cache: torch.Tensor) -> None:
    """Raise ValueError, naming the value and its limit, for a step the C++ would refuse (it
    checks too, but an exception thrown in a C++ extension crashed the process on one machine:
    torch 2.11 with g++ 13). The runner never builds such a step; ~2 us a sequence."""
    NB, BS = kv_cache.shape[2], kv_cache.shape[3]
    S = len(tokens)
    if not 1 <= S <= MAX_SEQS or not len(positions) == len(slots) == len(context_lens) == len(block_tables) == S:
        raise ValueError(f"cpu_step: 1 to {MAX_SEQS} sequences, one token, position, slot, context length and block "
                         f"table each; got {S} token ids and {len(block_tables)} block tables")
    problems = []
    for token, pos, ctx, slot, table in zip(tokens, positions, context_lens, slots, block_tables):
        problems += [f"token id {token} is outside [0, {vocab})" if not 0 <= token < vocab else "",
                     f"position {pos} is outside [0, n_ctx={n_ctx})" if not 0 <= pos < n_ctx else "",
                     f"slot {slot} is outside the pool's {NB * BS}" if not 0 <= slot < NB * BS else "",
                     f"context of {ctx} tokens does not fit a block table of {len(table)} blocks of {BS}"
                     if not 1 <= ctx <= len(table) * BS else ""]
        problems += [f"block {b} is outside the pool's {NB}" for b in table[:-(-ctx // BS)] if not 0 <= b < NB]
    if any(problems):
        raise ValueError("cpu_step: " + "; ".join(p for p in problems if p))
